"""Export a trained run (a ``distill`` or ``train_teacher`` workdir) to a PyTorch folder.

``export_from_workdir`` reads ``<workdir>/config.json`` and the newest finished checkpoint,
takes the evaluation-EMA params (or the target EMA, or the raw params) and writes the folder
of :func:`fewstep_jax.export.convert.export_params` with the run's metadata: path, prediction,
method, student form, s-conditioning and the recommended sampler (its time grid, gamma, kind).
Mode ``export`` of the entry point (``configs/export.py``):

    python -m fewstep_jax.main --config=configs/export.py --workdir=<run> --config.export.out=<folder>

A teacher run exports as a network predicting ``teacher.prediction``; its recommended sampler
is the Euler ODE solver on the path's default grid (``torch_sampler`` with form "euler" and no
s-conditioning is exactly that).

The folder names its source by the run folder's name and checkpoint step only, never by an
absolute path of the machine that trained it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path as FilePath
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fewstep_jax import solvers
from fewstep_jax.config_utils import as_tuple
from fewstep_jax.errors import UserError, did_you_mean
from fewstep_jax.export.convert import export_params
from fewstep_jax.paths import get_path
from fewstep_jax.teachers.neural import latest_checkpoint, restore_state_tree

RUN_MODES = ("distill", "train_teacher")
EMAS = ("eval", "target")


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a ``distill`` / ``train_teacher`` run wrote to ``<workdir>/config.json``; a
    missing workdir or config.json is a FileNotFoundError naming it."""
    if not FilePath(workdir).is_dir():
        raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} does not exist (expected a training run's)")
    cfg_file = FilePath(workdir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {workdir} (not the workdir of a training run)")
    config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
    mode = config.get("mode")
    if mode not in RUN_MODES:
        raise UserError(
            f"{cfg_file} is the config of a {mode!r} run, not of a training run {RUN_MODES} (if the "
            "workdir held a training run, its config.json has been overwritten)"
        )
    return config


def load_run_params(workdir: str | os.PathLike, ema: str | None = "eval") -> tuple[Any, int]:
    """(params of the trained network as jnp arrays, checkpoint step) of the newest checkpoint.

    ema: "eval" (the evaluation EMA), "target" (the consistency target EMA, when the method
    keeps one) or None (the raw trained params)."""
    if ema is not None and ema not in EMAS:
        raise UserError(
            f"ema must be one of {EMAS} or None (raw params), got {ema!r}{did_you_mean(ema, EMAS)}"
        )
    try:
        step_dir = latest_checkpoint(workdir)
    except FileNotFoundError as e:
        folder = FilePath(workdir) / "checkpoints"
        raise FileNotFoundError(f"no finished checkpoint to load in {folder}") from e
    state = restore_state_tree(step_dir)
    if ema is None:
        params = state["params"]
    else:
        emas = state.get("ema", {})
        if ema not in emas:
            raise UserError(f"checkpoint {step_dir} has no {ema!r} EMA (has {sorted(emas)})")
        params = emas[ema]
    return jax.tree.map(jnp.asarray, params), int(step_dir.name)


def is_teacher_run(config: ml_collections.ConfigDict) -> bool:
    return config.mode == "train_teacher"


def sampler_choice(
    config: ml_collections.ConfigDict, nfe: int = 0, gamma: float = -1.0, grid: str = ""
) -> tuple[int, float, str]:
    """(nfe, gamma, grid kind) a run samples with: the arguments when set (nfe > 0, gamma >= 0,
    grid non-empty), else the run's own ``config.sampler`` (largest of ``nfes``, first of
    ``gammas``); a teacher run defaults to the largest ``eval.train_nfes``, gamma 0 and the
    path's default grid (:func:`fewstep_jax.solvers.default_grid`)."""
    from fewstep_jax.solvers import default_grid

    if is_teacher_run(config):
        nfe = int(nfe) if nfe > 0 else max(as_tuple(config.eval.train_nfes, int))
        auto = default_grid(config.testbed.path) if config.eval.grid == "auto" else config.eval.grid
        g_kind = grid or auto
        return nfe, 0.0 if gamma < 0 else float(gamma), g_kind
    sc = config.sampler
    nfe = int(nfe) if nfe > 0 else max(as_tuple(sc.nfes, int))
    gamma = float(gamma) if gamma >= 0 else as_tuple(sc.gammas, float)[0]
    return nfe, gamma, grid or sc.grid


def steps_condition(config: ml_collections.ConfigDict, nfe: int) -> dict[str, Any]:
    """The step-count input of a steps-aware student at ``nfe`` ({} for others); ValueError if it
    was not trained for that NFE."""
    from fewstep_jax.evaluation.distill_eval import steps_kw_fn

    fn = None if is_teacher_run(config) else steps_kw_fn(config)
    if fn is None:
        return {}
    kw = fn(nfe)
    if kw is None:
        raise UserError(f"this steps-aware student was not trained for {nfe} steps (model.num_step_classes)")
    return kw


def export_meta(config: ml_collections.ConfigDict, nfe: int = 0, gamma: float = -1.0) -> dict[str, Any]:
    """The ``meta`` of ``export_params`` from a run's config (see module docstring)."""
    path = get_path(config.testbed.path)
    nfe, gamma, g_kind = sampler_choice(config, nfe, gamma)
    teacher = is_teacher_run(config)
    kind = "euler_ode" if teacher else config.sampler.kind
    if kind == "ctm" and gamma > 0:
        raise UserError(
            "torch_sampler implements gamma re-noising of kind 'tcd' only; export a 'ctm' student "
            "with gamma 0 (--config.export.gamma=0)"
        )
    sampler = {
        "grid": [float(t) for t in solvers.make_grid(g_kind, nfe, path)],
        "gamma": gamma,
        "kind": kind,
        "grid_kind": g_kind,
        "nfe": nfe,
    }
    steps = steps_condition(config, nfe)
    if steps:
        sampler["num_steps"] = int(steps["num_steps"])  # pass as num_steps= to the network
    return {
        "path": path,
        "prediction": config.teacher.prediction if teacher else config.student.prediction,
        "method": "teacher" if teacher else (config.method or "student"),
        "student_form": "euler" if teacher else config.student.form,
        "uses_s": False if teacher else bool(config.model.get("use_s", False)),
        "sampler": sampler,
        "num_classes": int(config.model.get("num_classes", 0)),
        "testbed": config.testbed.name,
    }


def export_from_workdir(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ema: str | None = "eval",
    dtype: str = "float32",
    overwrite: bool = False,
    nfe: int = 0,
    gamma: float = -1.0,
    check: bool = False,
) -> str:
    """Writes the exported folder of the run in ``workdir`` to ``out_dir``; returns its fewstep.json.

    ema: "eval" | "target" | None (raw params). dtype: "float32" | "bfloat16". nfe / gamma: the
    recommended sampler (0 / -1: from the run's config). check: then compare the folder in
    PyTorch with the JAX network (:func:`fewstep_jax.export.check.check_export`; needs torch,
    checked before anything is written). An existing ``out_dir`` is a FileExistsError unless
    overwrite; a workdir without a finished checkpoint is a FileNotFoundError naming its
    checkpoints folder.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"export folder {out_dir!r} already exists; pass overwrite=True to replace it")
    config = read_run_config(workdir)
    if check:
        from fewstep_jax.export.check import check_export, require_mirror

        require_mirror(config.model, "the PyTorch self-check of an export")
    meta = export_meta(config, nfe, gamma)
    params, step = load_run_params(workdir, ema)
    run_name = os.path.basename(os.path.abspath(workdir))  # not the path: it is the trainer's machine's
    meta.update(source_run=run_name, checkpoint_step=step, ema=ema or "raw")
    path = export_params(params, config.model, out_dir, dtype=dtype, meta=meta, overwrite=overwrite)
    if check:
        check_export(out_dir, params, config.model)
    return path


__all__ = [
    "export_from_workdir",
    "export_meta",
    "load_run_params",
    "read_run_config",
    "sampler_choice",
    "steps_condition",
]
