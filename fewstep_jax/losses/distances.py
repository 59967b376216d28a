"""Distances between predictions and targets, shared by every loss family (docs/methods.md §1.3).

* ``l2``: squared error, averaged over the dimensions of a sample.
* ``huber`` (alias ``pseudo_huber``), elementwise form (diffusers LCM, TCD scripts, TDM demo):
  ``sqrt((a-b)^2 + c^2) - c`` per element, ``c = 1e-3`` by default.
* ``huber_vec``, vector form (iCT): ``sqrt(|a-b|^2 + c^2) - c`` per sample, ``c = 0.00054 sqrt(d)``.

The two pseudo-Huber forms differ in scale by about sqrt(d) (pitfall 16): pick one explicitly.
:data:`DISTANCES` is the one list of kinds; each family allows a subset (:func:`allowed`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
DISTANCES = ("l2", "huber", "pseudo_huber", "huber_vec")


def allowed(*kinds: str) -> tuple[str, ...]:
    """A family's allowed distance kinds, each one of :data:`DISTANCES` (checked at import)."""
    bad = [k for k in kinds if k not in DISTANCES]
    if bad:
        raise ValueError(f"distances {bad} are not in DISTANCES {DISTANCES}")
    return kinds


def elementwise(diff: Array, kind: str = "l2", c: float = 0.0) -> Array:
    """Per-element distance of a difference (any shape), for ``l2`` and elementwise ``huber``."""
    if kind == "l2":
        return diff * diff
    if kind in ("huber", "pseudo_huber"):
        c = c or 1e-3
        return jnp.sqrt(diff * diff + c * c) - c
    raise ValueError(f"distance {kind!r} has no elementwise form; expected 'l2' or 'huber'")


def distance(a: Array, b: Array, kind: str = "l2", c: float = 0.0) -> Array:
    """Per-sample distance (B,) between ``a`` and ``b`` (B, ...); ``c = 0`` means the default constant."""
    diff = (a - b).reshape(a.shape[0], -1).astype(jnp.float32)
    if kind == "huber_vec":
        c = c or 0.00054 * math.sqrt(diff.shape[1])
        return jnp.sqrt(jnp.sum(diff * diff, axis=1) + c * c) - c
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; expected one of {DISTANCES}")
    return jnp.mean(elementwise(diff, kind, c), axis=1)


def mean_distance(a: Array, b: Array, kind: str = "l2", c: float = 0.0) -> Array:
    """Batch mean of :func:`distance`: a float32 scalar."""
    return jnp.mean(distance(a, b, kind, c))


__all__ = ["DISTANCES", "allowed", "distance", "elementwise", "mean_distance"]
