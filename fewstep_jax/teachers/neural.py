"""A trained network as a Teacher (docs/design.md "Teacher", source *neural*).

``neural_teacher`` wraps params of a ``fewstep_jax.models`` network; ``load_teacher_from_workdir``
rebuilds one from a ``train_teacher`` run: ``<workdir>/config.json`` (model, path, prediction)
and the eval-EMA params of the newest checkpoint in ``<workdir>/checkpoints``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path as FilePath
from typing import Any

import jax
import ml_collections
import numpy as np

from fewstep_jax.models import build_model
from fewstep_jax.paths import Path, get_path
from fewstep_jax.teachers.base import Teacher

CHECKPOINTS = "checkpoints"
COMMIT_MARKER = "commit_success.txt"  # fewstep_jax.runs.checkpoints.COMMIT_MARKER


@functools.lru_cache(maxsize=64)
def _apply_for(model_json: str):
    # One apply function per model config, so rebuilt teachers reuse compiled programs.
    model = build_model(ml_collections.ConfigDict(json.loads(model_json)))

    def apply(params, x, t, label):
        return model.apply({"params": params}, x, t, label=label)

    return apply


def neural_teacher(
    model_cfg: ml_collections.ConfigDict,
    params: Any,
    path: Path | str,
    prediction: str,
    data_shape: tuple[int, ...],
    num_classes: int = 0,
    name: str = "neural",
) -> Teacher:
    """Teacher whose ``apply`` is the network of ``model_cfg`` at ``params`` (a pytree leaf)."""
    path = get_path(path) if isinstance(path, str) else path
    cfg_json = json.dumps(ml_collections.ConfigDict(model_cfg).to_dict(), sort_keys=True, default=list)
    if int(model_cfg.get("num_classes", 0)) != int(num_classes):
        raise ValueError(
            f"num_classes={num_classes} differs from the model's {model_cfg.get('num_classes', 0)}"
        )
    return Teacher(
        params=params,
        apply=_apply_for(cfg_json),
        path=path,
        prediction=prediction,
        data_shape=tuple(int(d) for d in data_shape),
        num_classes=int(num_classes),
        name=name,
    )


def latest_checkpoint(workdir: str | FilePath) -> FilePath:
    """``<workdir>/checkpoints/<step>`` of the newest committed step; FileNotFoundError if none."""
    root = FilePath(workdir) / CHECKPOINTS
    steps = (
        sorted(
            (int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / COMMIT_MARKER).exists()),
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {root} (train the teacher first)")
    return root / str(steps[0])


def restore_state_tree(step_dir: str | FilePath) -> dict:
    """The stored train state of one checkpoint step as a nested dict of numpy arrays (on the
    host, whatever mesh wrote it)."""
    import orbax.checkpoint as ocp

    item = FilePath(step_dir).absolute() / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
        state = ckptr.restore(item, target)
    return jax.tree.map(np.asarray, state)


def data_shape_of(model_cfg: ml_collections.ConfigDict, params: Any) -> tuple[int, ...]:
    """Shape of one sample the network takes: (D,) for an MLP (from its input layer's kernel in
    ``params``, bare or wrapped as ``{"params": ...}``), (H, W, C) for a UNet (from ``model_cfg``)."""
    name = model_cfg.get("name")
    if name == "unet":
        size = int(model_cfg.sample_size)
        return (size, size, int(model_cfg.in_channels))
    if name == "mlp":
        params = params.unfreeze() if hasattr(params, "unfreeze") else params
        if isinstance(params, dict) and set(params) == {"params"}:
            params = params["params"]
        try:
            return (int(np.shape(params["input_proj"]["kernel"])[0]),)
        except (KeyError, TypeError) as e:
            raise ValueError("MLP params have no 'input_proj/kernel' (is this an MLP?)") from e
    raise ValueError(f"unknown architecture {name!r}; expected one of ['mlp', 'unet']")


def load_teacher_from_workdir(workdir: str | FilePath, ema: str = "eval") -> Teacher:
    """The teacher trained in ``workdir`` (eval-EMA params of its newest checkpoint)."""
    workdir = FilePath(workdir)
    cfg_file = workdir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {workdir} (not a train_teacher workdir)")
    config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
    step_dir = latest_checkpoint(workdir)
    state = restore_state_tree(step_dir)
    if ema not in state.get("ema", {}):
        raise ValueError(f"checkpoint {step_dir} has no {ema!r} EMA (has {sorted(state.get('ema', {}))})")
    params = jax.tree.map(jax.numpy.asarray, state["ema"][ema])
    model_cfg = config.model
    return neural_teacher(
        model_cfg,
        params,
        config.testbed.path,
        config.teacher.prediction,
        data_shape_of(model_cfg, params),
        int(model_cfg.get("num_classes", 0)),
        name=f"neural:{workdir.name}",
    )


__all__ = [
    "data_shape_of",
    "latest_checkpoint",
    "load_teacher_from_workdir",
    "neural_teacher",
    "restore_state_tree",
]
