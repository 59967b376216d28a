"""Mode ``sample``: draw samples from a trained run (student or teacher) at any NFE and sampler.

``sample_workdir`` loads the network of a ``distill`` run (its student, sampled with
:func:`fewstep_jax.samplers.sample`, compiled by ``evaluation.student_eval.run_chain``: a chain of
``nfe`` flow-map jumps, re-noised with ``gamma``) or of a ``train_teacher`` run (its ODE, solved
with a fixed-step solver of :mod:`fewstep_jax.solvers` for ``nfe`` network evaluations), and
returns (N, ...) samples. ``run`` writes them with the noise they came from to ``samples.npz`` and
a grid / scatter to ``samples.png`` (``configs/sample.py``):

    python -m fewstep_jax.main --config=configs/sample.py --workdir=<run> --config.sample.nfe=2
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax import solvers
from fewstep_jax.evaluation import report
from fewstep_jax.evaluation.student_eval import run_chain
from fewstep_jax.export.workdir import (
    is_teacher_run,
    load_run_params,
    read_run_config,
    sampler_choice,
    steps_condition,
)
from fewstep_jax.paths import get_path
from fewstep_jax.students import Student
from fewstep_jax.teachers.neural import data_shape_of, neural_teacher
from fewstep_jax.train.networks import build_student


@partial(jax.jit, static_argnames=("method",))
def _teacher_solve(teacher, x, grid, method, label, guidance):
    return teacher.solve(x, grid, method, label=label, guidance=guidance)


def run_student(config: ml_collections.ConfigDict) -> Student:
    """The Student wrapper of a distill run's network (form, prediction, path of its config)."""
    return build_student(
        config.model,
        get_path(config.testbed.path),
        form=config.student.form,
        prediction=config.student.prediction,
    )


def labels_for(num_classes: int, label: int, n: int) -> np.ndarray | None:
    """(n,) int32 labels: None for an unconditional model; -1 null, -2 cycles 0..C-1, else fixed."""
    if num_classes <= 0:
        return None
    if label == -2:
        return (np.arange(n) % num_classes).astype(np.int32)
    if not -1 <= label < num_classes:
        raise ValueError(
            f"sample.label={label}: expected -2 (cycle), -1 (null) or a class in [0, {num_classes})"
        )
    return np.full((n,), label, np.int32)


def sample_workdir(
    workdir: str | os.PathLike,
    num: int,
    *,
    nfe: int = 0,
    gamma: float = -1.0,
    grid: str = "",
    solver: str = "euler",
    seed: int = 0,
    label: int = -1,
    guidance: float = 1.0,
    ema: str | None = "eval",
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Samples the network trained in ``workdir``; returns {"x" (num, ...), "noise" (num, ...)
    standard normal, "label" (num,) or absent, "grid", "nfe", "gamma", "sampler", "name"}.

    nfe / gamma / grid: 0 / < 0 / "" take the run's own sampler (``sampler_choice``). solver: the
    fixed-step solver of a teacher run (``nfe`` must be a multiple of its evaluations per step).
    The noise is ``normal(PRNGKey(seed))``; the noise injected between student jumps (gamma > 0)
    is ``normal(fold_in(PRNGKey(seed), 1))`` of shape (nfe - 1, num, ...).
    """
    config = read_run_config(workdir)
    nfe, gamma, g_kind = sampler_choice(config, nfe, gamma, grid)
    params, step = load_run_params(workdir, ema)
    path = get_path(config.testbed.path)
    shape = data_shape_of(config.model, params)
    key = jax.random.PRNGKey(int(seed))
    noise = np.asarray(jax.random.normal(key, (num, *shape), jnp.float32))
    labels = labels_for(int(config.model.get("num_classes", 0)), int(label), num)
    out: list[np.ndarray] = []
    if is_teacher_run(config):
        if solver not in solvers.NFE_PER_STEP:
            raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(solvers.NFE_PER_STEP)}")
        per = solvers.NFE_PER_STEP[solver]
        if nfe % per:
            raise ValueError(f"nfe={nfe} is not a multiple of {solver}'s {per} evaluations per step")
        grid_arr = jnp.asarray(solvers.make_grid(g_kind, nfe // per, path))
        nc = int(config.model.get("num_classes", 0))
        teacher = neural_teacher(config.model, params, path, config.teacher.prediction, shape, nc)
        for i in range(0, num, batch_size):
            lab = None if labels is None else jnp.asarray(labels[i : i + batch_size])
            x1 = path.prior_scale * jnp.asarray(noise[i : i + batch_size])
            out.append(np.asarray(_teacher_solve(teacher, x1, grid_arr, solver, lab, jnp.float32(guidance))))
        name, sampler = f"teacher {solver}", solver
    else:
        student = run_student(config)
        grid_arr = jnp.asarray(solvers.make_grid(g_kind, nfe, path))
        kw = steps_condition(config, nfe)
        if config.model.get("use_guidance", False):
            kw["guidance"] = jnp.full((num,), guidance, jnp.float32)
        if labels is not None:
            kw["label"] = jnp.asarray(labels)
        injected = jax.random.normal(jax.random.fold_in(key, 1), (nfe - 1, num, *shape), jnp.float32)
        for i in range(0, num, batch_size):
            sl = slice(i, i + batch_size)
            bkw = {k: (v[sl] if jnp.ndim(v) else v) for k, v in kw.items()}
            x = run_chain(
                student,
                params,
                jnp.asarray(noise[sl]),
                grid_arr,
                jnp.float32(gamma),
                injected[:, sl],
                config.sampler.kind,
                bkw,
            )
            out.append(np.asarray(x))
        name, sampler = config.method or "student", config.sampler.kind
    result = {
        "x": np.concatenate(out),
        "noise": noise,
        "grid": np.asarray(grid_arr, np.float32),
        "nfe": nfe,
        "gamma": gamma,
        "sampler": sampler,
        "name": name,
        "checkpoint_step": step,
    }
    if labels is not None:
        result["label"] = labels
    return result


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Mode ``sample``: writes ``samples.npz`` and ``samples.png``; returns the output folder."""
    sc = config.sample
    res = sample_workdir(
        workdir,
        int(sc.num),
        nfe=int(sc.nfe),
        gamma=float(sc.gamma),
        grid=sc.grid,
        solver=sc.solver,
        seed=int(sc.seed),
        label=int(sc.label),
        guidance=float(sc.guidance),
        ema=None if sc.ema in ("", "raw", "none") else sc.ema,
        batch_size=int(sc.batch_size),
    )
    tag = f"{res['name'].replace(' ', '_')}_nfe{res['nfe']}_gamma{res['gamma']:g}_seed{int(sc.seed)}"
    out = FilePath(sc.out or FilePath(workdir) / "samples" / tag)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", **res)
    title = res["name"] if res["gamma"] == 0 else f"{res['name']} (gamma {res['gamma']:g})"
    report.plot_samples({title: {res["nfe"]: res["x"]}}, str(out / "samples.png"))
    print(f"wrote {len(res['x'])} samples to {out}", flush=True)
    return str(out)


__all__ = ["labels_for", "run", "run_student", "sample_workdir"]
