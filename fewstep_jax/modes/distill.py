"""Mode ``distill``: train a student with the config's loss terms from a network teacher
(``config.teacher.workdir``) or the testbed's analytic teacher, then score it (the distillation
report).

Testbeds: an exact testbed (``gmm8``, ..., ``mnist``: analytic teacher, evaluations against its
exact flow map) or a real dataset ``tfds:<name>`` (:mod:`fewstep_jax.testbeds.dataset`: no
analytic teacher, evaluations draw samples and give FID when ``eval.fid_inception`` /
``fid_reference`` are set; distilling needs a network teacher, ``teacher.workdir``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import parallel
from fewstep_jax.evaluation.distill_eval import distill_report
from fewstep_jax.evaluation.report import write_run_report
from fewstep_jax.students import Student
from fewstep_jax.testbeds import Testbed, make_testbed_from_config, teacher_data_source
from fewstep_jax.train.loop import host_tree, train
from fewstep_jax.train.networks import distill_nets
from fewstep_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Distilled:
    """What a distillation run produced: the final state, the student wrapper, the teacher."""

    state: TrainState
    student: Student
    teacher: Any
    testbed: Testbed
    train_seconds: float

    def params(self, ema: str = "eval") -> Any:
        """The student's params (an EMA copy by default) as host arrays."""
        return jax.tree.map(jnp.asarray, host_tree(self.state.ema[ema] if ema else self.state.params))


def teacher_pairs(config: ml_collections.ConfigDict, workdir: str, teacher) -> dict[str, np.ndarray]:
    """The teacher's (noise, sample) pairs of a ``student.data = "pairs"`` run (reflow): read from
    ``<workdir>/pairs.npz``, else generated once with ``config.student.pairs`` (num, solver, steps,
    batch_size; see :func:`fewstep_jax.teachers.pairs.generate_pairs`) and saved there, so a resumed run
    trains on the same pairs. Conditional teachers get uniform random labels."""
    from fewstep_jax.teachers import pairs as teacher_pairs_io

    f = FilePath(workdir) / "pairs.npz"
    if f.is_file():
        return teacher_pairs_io.load_pairs(f)
    pc = dict(config.student.get("pairs", None) or {})
    n = int(pc.get("num", 10_000))
    nc = int(config.model.get("num_classes", 0))
    labels = np.random.default_rng(int(config.seed)).integers(0, nc, n).astype(np.int32) if nc else None
    t0 = time.time()
    pairs = teacher_pairs_io.generate_pairs(
        teacher,
        jax.random.PRNGKey(int(config.seed) + 1),
        n,
        batch_size=int(pc.get("batch_size", 1000)),
        method=pc.get("solver", "heun"),
        num_steps=int(pc.get("steps", 32)),
        labels=labels,
    )
    if jax.process_index() == 0:  # every process generated the same pairs; one writes them
        tmp = FilePath(workdir) / "pairs.tmp.npz"
        teacher_pairs_io.save_pairs(tmp, pairs)
        tmp.replace(f)  # atomic: a preempted run never leaves a half-written pair file
        logging.info("generated %d teacher pairs in %.1f s -> %s", n, time.time() - t0, f)
    return pairs


def distill(config: ml_collections.ConfigDict, workdir: str, evaluate: bool = True) -> Distilled:
    """Generic distillation: the teacher from ``config.teacher.workdir`` (a train_teacher run)
    or the testbed's analytic teacher; the student (``config.model``, ``config.student``)
    initialised from a network teacher or fresh; loss terms from ``config.losses`` and aux
    networks from ``config.aux_nets``; batches of testbed data (``student.data = "data"``),
    noise only (``"noise"``) or the teacher's (noise, sample) pairs (``"pairs"``, see
    :func:`teacher_pairs`). Method-specific evaluation lands with the method issues."""
    from fewstep_jax.data import NoiseSource
    from fewstep_jax.teachers.neural import load_teacher_from_workdir

    parallel.initialize_distributed()
    if not config.losses:
        raise ValueError("distill needs config.losses (the method's loss terms)")
    testbed = make_testbed_from_config(config)
    wd = config.teacher.workdir
    if not wd and not testbed.has_exact_teacher:
        raise ValueError(
            f"testbed {testbed.name!r} is a real dataset with no analytic teacher: set "
            "config.teacher.workdir to a train_teacher run on it"
        )
    teacher = load_teacher_from_workdir(wd) if wd else testbed.exact_teacher
    data_needed = not testbed.has_exact_teacher and config.student.data == "data"
    if data_needed and tuple(teacher.data_shape) != testbed.data_shape:
        raise ValueError(
            f"teacher {wd!r} makes images {teacher.data_shape}; dataset {testbed.name!r} has "
            f"{testbed.data_shape}"
        )
    if config.student.data == "noise":
        nc = int(config.model.get("num_classes", 0)) or None
        source = NoiseSource(
            teacher.data_shape,
            int(config.train.batch_size),
            int(config.seed),
            nc,
            jax.process_index(),
            jax.process_count(),
        )
    elif config.student.data == "data":
        source = teacher_data_source(config, testbed)
    elif config.student.data == "pairs":
        from fewstep_jax.teachers.pairs import pair_source

        pairs = teacher_pairs(config, workdir, teacher)
        source = pair_source(
            pairs, int(config.train.batch_size), int(config.seed), jax.process_index(), jax.process_count()
        )
    else:
        raise ValueError(f"student.data={config.student.data!r}; expected 'data', 'noise' or 'pairs'")
    main, aux = distill_nets(config, teacher, teacher.data_shape)
    t0 = time.time()
    state = train(
        config,
        workdir,
        student_factory=lambda c: (main, aux),
        teacher=teacher,
        data_source=source,
        report_fn=write_run_report,
    )
    out = Distilled(state, main.student, teacher, testbed, time.time() - t0)
    # an exact testbed with its analytic teacher: score the student against Phi; a real dataset:
    # samples (and FID) of the student and of the network teacher's solvers
    if evaluate and jax.process_index() == 0 and (not testbed.has_exact_teacher or not wd):
        distill_report(
            config, workdir, main.student, out.params(), testbed, out.train_seconds, teacher=teacher
        )
    return out


run = distill

__all__ = ["Distilled", "distill", "run", "teacher_pairs"]
