"""Pieces shared by the distribution-matching generator and fake-score terms (TDM, DMD).

The generator terms pull a sample along the normalised distribution-matching direction
``(x0_fake - x0_real) / (mean_D |x - x0_real| + eps)``; :func:`normalizer`, :func:`dm_metrics` and
:func:`guard_normalizer` are that normaliser, its metrics and its degenerate-value guard
(docs/methods.md pitfall 13), written once for both surrogates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewstep_jax.paths import Path

Array = jax.Array
sg = jax.lax.stop_gradient

# degenerate-normaliser limits of the generator terms (the family doc); None disables a check. Full
# gmm8 runs (tdm, tdm_k1, tdm_unify, dmd, dmd2: 2000 steps x 256) peak at grad_scale_max 620
# (p99 of the per-step max ~100) and normalizer_max 3.6: the defaults leave a 16x margin
NORMALIZER_GUARD = {"max_grad_scale": 1e4, "max_normalizer": 1e4}


def mean_dims(x: Array) -> Array:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def normalizer(x: Array, x_real: Array, eps: float) -> tuple[Array, Array, Array]:
    """``(1 / (mean_D |x - x_real| + eps) or 0 where non-finite, raw normaliser, finite flag)``, (B,)."""
    wf = sg(mean_dims(jnp.abs(x - x_real)))
    finite = jnp.isfinite(wf)
    inv = jnp.where(finite, 1.0 / (jnp.where(finite, wf, 1.0) + eps), 0.0)
    return inv, wf, finite


def guard_normalizer(
    loss: Array,
    metrics: dict,
    direction: Array,
    inv: Array,
    wf: Array,
    finite: Array,
    max_grad_scale: float | None,
    max_normalizer: float | None,
) -> tuple[Array, dict]:
    """NaN loss and ``metrics["nonfinite/normalizer"] = 1`` when a finite normaliser is degenerate.

    Per sample (finite ones only; non-finite ones are the ``nonfinite/targets`` flag's): the
    gradient scale ``mean_D |direction| * inv`` (``inv = 1 / (wf + eps)``) above
    ``max_grad_scale`` (the normaliser collapsed to ~0 while the DM direction did not, or the
    direction blew up), or ``wf`` above ``max_normalizer`` (exploded). The NaN has zero gradient
    (``where``), so ``train.skip_nonfinite`` skips the step and otherwise the loop stops.
    """
    scale = mean_dims(jnp.abs(direction)) * inv
    bad = jnp.zeros(wf.shape, bool)
    if max_grad_scale is not None:
        bad = bad | (scale > float(max_grad_scale))
    if max_normalizer is not None:
        bad = bad | (jnp.where(finite, wf, 0.0) > float(max_normalizer))
    bad = jnp.any(bad & finite)
    metrics = {
        **metrics,
        "grad_scale_max": jnp.max(jnp.where(finite, scale, 0.0)),
        "normalizer_max": jnp.max(jnp.where(finite, wf, 0.0)),
        "nonfinite/normalizer": bad.astype(jnp.float32),
    }
    return jnp.where(bad, jnp.nan, loss), metrics


def dm_metrics(direction: Array, wf: Array, finite: Array, raw: Array) -> dict:
    return {
        # 1.0 when a target or normaliser was not finite (zeroed above): the train loop stops on
        # it naming "<term>/targets" unless train.skip_nonfinite (then training goes on, DMD2's
        # nan_to_num)
        "nonfinite/targets": 1.0 - (jnp.all(finite) & jnp.all(jnp.isfinite(raw))).astype(jnp.float32),
        "dm_gap": jnp.mean(jnp.abs(direction)),
        "normalizer": jnp.sum(jnp.where(finite, wf, 0.0)) / jnp.maximum(jnp.sum(finite), 1),
        "normalizer_min": jnp.min(jnp.where(finite, wf, jnp.inf)),
        # 1.0 when every per-sample normaliser is finite; < 1 flags a NaN / exploding target
        "normalizer_finite": jnp.mean(finite.astype(jnp.float32)),
    }


def guard_limits(c: dict) -> tuple[float | None, float | None]:
    """``(max_grad_scale, max_normalizer)`` of a generator term's options (None: no check)."""
    out = []
    for key in ("max_grad_scale", "max_normalizer"):
        v = c[key]
        if v is not None and not float(v) > 0:
            raise ValueError(f"{key} must be > 0 or None (no check), got {v!r}")
        out.append(None if v is None else float(v))
    return out[0], out[1]


def noise_batch(batch: dict) -> tuple[Array, Array | None]:
    """``(batch["noise"], batch.get("label"))``: the terms are data-free."""
    if "noise" not in batch:
        raise ValueError(f"distribution-matching terms need batch['noise']; the batch has {sorted(batch)}")
    return batch["noise"], batch.get("label")


def prior(path: Path, noise: Array) -> Array:
    # sigma(1) * eps as Teacher.prior (path.prior_scale is a Python float, not traceable)
    return noise * path.sigma(jnp.ones((), jnp.float32))


__all__ = [
    "NORMALIZER_GUARD",
    "dm_metrics",
    "finite_or_zero",
    "guard_limits",
    "guard_normalizer",
    "mean_dims",
    "noise_batch",
    "normalizer",
    "prior",
]
