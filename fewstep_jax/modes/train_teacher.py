"""Mode ``train_teacher``: train a teacher network on a testbed's data with ``config.losses``
(flow_matching or diffusion), evaluated while it trains against the analytic teacher (or by its
samples on a dataset), ``teacher_eval.json`` at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path as FilePath

import jax
import ml_collections

from fewstep_jax import parallel
from fewstep_jax.evaluation.report import write_run_report
from fewstep_jax.evaluation.teacher_training import teacher_eval_fn
from fewstep_jax.runs import writers
from fewstep_jax.testbeds import make_testbed_from_config, teacher_data_source
from fewstep_jax.train.loop import train
from fewstep_jax.train.networks import teacher_network
from fewstep_jax.train.state import TrainState


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains a teacher network on the testbed's data with ``config.losses`` (flow_matching or
    diffusion); measures it against the analytic teacher at the end (``teacher_eval.json``)."""
    parallel.initialize_distributed()
    if not config.losses:
        raise ValueError("train_teacher needs config.losses (e.g. flow_matching or diffusion)")
    t0 = time.time()
    testbed = make_testbed_from_config(config)
    testbed.check_model(config.model)  # a real dataset: the network must fit its images and labels
    net = teacher_network(config, testbed.data_shape)
    state = train(
        config,
        workdir,
        student_factory=lambda c: (net, {}),
        teacher=None,
        data_source=teacher_data_source(config, testbed),
        eval_fn=teacher_eval_fn(config, testbed),
        report_fn=write_run_report,
    )
    if jax.process_index() == 0:
        evals = [r for r in writers.read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
        with open(FilePath(workdir) / "teacher_eval.json", "w") as f:
            json.dump({"wall_seconds": time.time() - t0, "eval": evals[-1] if evals else {}}, f, indent=1)
    return state


run = train_teacher

__all__ = ["run", "train_teacher"]
