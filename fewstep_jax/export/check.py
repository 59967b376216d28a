"""Self-check of an exported folder: its PyTorch mirror (``torch_models.load_exported``) against the
JAX network on the same random inputs. Needs torch (and diffusers for a UNet), imported here only:
a missing one is a UserError naming the extra to install."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from fewstep_jax.errors import require
from fewstep_jax.models import build_model

# float32: the mirrors match under 1e-4 (tests/test_export.py); bfloat16 weights: ~1% relative
RTOL = {"float32": 1e-4, "bfloat16": 0.05}


def needs(model_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The packages the PyTorch mirror of ``model_cfg`` imports."""
    return ("torch", "diffusers") if model_cfg.get("name") == "unet" else ("torch",)


def require_mirror(model_cfg: ml_collections.ConfigDict, purpose: str) -> None:
    """UserError naming the install command when a package of ``needs(model_cfg)`` is missing."""
    for module in needs(model_cfg):
        require(module, purpose)


def mirror_inputs(model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...], batch: int, seed: int):
    """(x (B, *data_shape) NHWC / (B, D), t (B,), conditioning kwargs) covering every input branch
    the config has (s, label incl. the null class -1, guidance, num_steps)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *data_shape)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, batch).astype(np.float32)
    cond: dict[str, np.ndarray] = {}
    if model_cfg.get("use_s", False):
        cond["s"] = (t * rng.uniform(0.0, 1.0, batch)).astype(np.float32)
    if int(model_cfg.get("num_classes", 0)) > 0:
        cond["label"] = rng.integers(-1, int(model_cfg.num_classes), batch).astype(np.int32)
    if model_cfg.get("use_guidance", False):
        cond["guidance"] = rng.uniform(1.0, 8.0, batch).astype(np.float32)
    if int(model_cfg.get("num_step_classes", 0)) > 0:
        cond["num_steps"] = rng.integers(0, int(model_cfg.num_step_classes), batch).astype(np.int32)
    return x, t, cond


def check_export(
    folder: str, params: Any, model_cfg: ml_collections.ConfigDict, *, batch: int = 2, seed: int = 0
) -> float:
    """Max |PyTorch - JAX| of the network outputs of the exported ``folder`` and of ``params`` /
    ``model_cfg`` at random inputs (:func:`mirror_inputs`); a ValueError when it exceeds the
    tolerance of the folder's dtype (``RTOL`` times the output scale, at least 1)."""
    require_mirror(model_cfg, "the PyTorch self-check of an export")
    import torch

    from fewstep_jax.export import torch_models

    model, meta = torch_models.load_exported(folder)
    x, t, cond = mirror_inputs(model_cfg, tuple(meta["data_shape"]), batch, seed)
    ref = np.asarray(
        build_model(model_cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(t), **cond), np.float32
    )
    nchw = x.ndim == 4  # the mirror is NCHW, the JAX UNet NHWC
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if nchw else x)
    with torch.no_grad():
        out = model(xt, torch.from_numpy(t), **{k: torch.from_numpy(v) for k, v in cond.items()})
    got = out.float().numpy()
    got = got.transpose(0, 2, 3, 1) if nchw else got
    err = float(np.abs(got - ref).max())
    tol = RTOL[meta["dtype"]] * max(1.0, float(np.abs(ref).max()))
    if not err <= tol:
        raise ValueError(
            f"exported folder {folder!r} differs from the JAX network: max |diff| {err:.3g} > {tol:.3g}"
        )
    return err


__all__ = ["RTOL", "check_export", "mirror_inputs", "needs", "require_mirror"]
