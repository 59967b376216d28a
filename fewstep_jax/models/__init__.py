"""Networks of every teacher and student: a residual MLP and a diffusers-compatible UNet.

Every model is pure and shares one call signature:
    model.apply({"params": params}, x, t, s=None, label=None, guidance=None, num_steps=None,
                train=False, rngs={"dropout": key})  -> array of x.shape, float32
with x (B, D) for "mlp" and NHWC (B, H, W, C) for "unet", t scalar or (B,) in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from fewstep_jax.models.embeddings import (
    TimestepEmbedding,
    guidance_scale_embedding,
    timestep_embedding,
)
from fewstep_jax.models.mlp import MLP, mlp_config
from fewstep_jax.models.unet import (
    UNet2D,
    diffusers_config,
    diffusers_key,
    to_diffusers_state_dict,
    unet_config,
)

__all__ = [
    "MLP",
    "TimestepEmbedding",
    "UNet2D",
    "build_model",
    "diffusers_config",
    "diffusers_key",
    "guidance_scale_embedding",
    "init_student_from_teacher",
    "mlp_config",
    "timestep_embedding",
    "to_diffusers_state_dict",
    "unet_config",
]

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet2D}


def build_model(cfg: ml_collections.ConfigDict) -> nn.Module:
    """Model named by cfg.name ("mlp" | "unet"); other cfg fields are its attributes.

    Missing fields take the class defaults; an unknown field or name is a ValueError.
    """
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"unknown {name} model config keys {unknown}; known: {sorted(fields)}")
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)  # config lists -> hashable module attributes
    return cls(**kwargs)


def init_student_from_teacher(student_params: Any, teacher_params: Any) -> Any:
    """Copy every teacher leaf into the student tree; keep the student's extra leaves.

    Both trees are nested dicts (with or without the "params" level, but the same in both).
    A teacher leaf missing from the student, or of another shape, is a ValueError naming its
    key. Because the student-only branches are zero-initialised, the result computes exactly
    the teacher's function.
    """
    student = traverse_util.flatten_dict(_unfreeze(student_params))
    teacher = traverse_util.flatten_dict(_unfreeze(teacher_params))
    for path, value in teacher.items():
        key = "/".join(path)
        if path not in student:
            raise ValueError(f"teacher param {key!r} has no counterpart in the student params")
        if tuple(student[path].shape) != tuple(value.shape):
            raise ValueError(
                f"shape mismatch at {key!r}: teacher {tuple(value.shape)} vs student "
                f"{tuple(student[path].shape)}"
            )
        student[path] = jnp.asarray(value, student[path].dtype)
    return traverse_util.unflatten_dict(student)


def _unfreeze(tree: Any) -> Any:
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree
