"""Teacher objectives: flow matching (rectified-flow velocity) and diffusion (eps / v / x0).

Both regress the network's native prediction (``student.prediction``) onto the target implied
by ``(x0, eps)`` at a random time on ``student.path``: with ``x_t = alpha x0 + sigma eps`` the
velocity target is ``alpha' x0 + sigma' eps`` (``eps - x0`` on the rectified-flow path).
Batches carry ``"x"`` (B, ...) data and, for conditional teachers, ``"label"`` (B,) int32,
replaced by the null label -1 with probability ``label_dropout`` (classifier-free guidance).

Config keys (besides the train step's ``weight``), read by :func:`~fewstep_jax.losses.options.read_options`:
  flow_matching: t_min (1e-3), t_sampling ("uniform" | "logit_normal"), logit_mean (0.0),
    logit_std (1.0), label_dropout (0.0).
  diffusion: t_min (1e-3), t_sampling ("uniform" | "discrete": DDPM timesteps k -> (k+1)/T on
    the ddpm path), label_dropout (0.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fewstep_jax.losses.api import LossInputs, register
from fewstep_jax.losses.options import read_options
from fewstep_jax.students import Student
from fewstep_jax.teachers.base import NULL_LABEL

Array = jax.Array

FLOW_MATCHING_DEFAULTS = {
    "t_min": 1e-3,
    "t_sampling": "uniform",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "label_dropout": 0.0,
}
DIFFUSION_DEFAULTS = {"t_min": 1e-3, "t_sampling": "uniform", "label_dropout": 0.0}


def drop_labels(rng: Array, label: Array, p: float) -> Array:
    """Each label becomes NULL_LABEL (-1) with probability ``p``; (B,) int32."""
    if p <= 0:
        return label
    drop = jax.random.bernoulli(rng, p, label.shape)
    return jnp.where(drop, NULL_LABEL, label).astype(jnp.int32)


def _regression(student: Student, params, batch: dict, t: Array, rng: Array, p_drop: float):
    """Mean squared error of the network's prediction at x_t against the (x0, eps) target."""
    k_eps, k_lab, k_drop = jax.random.split(rng, 3)
    x0 = batch["x"]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    label = batch.get("label")
    if label is not None:
        label = drop_labels(k_lab, label, p_drop)
    xt = student.path.interpolate(x0, eps, t)
    target = jax.lax.stop_gradient(student.path.from_x0_eps(student.prediction, x0, eps, t))
    pred = student.network(params, xt, t, label=label, rng=k_drop, train=True)
    per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target).reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(per_sample), {"mean_t": jnp.mean(t)}


@register("flow_matching")
def flow_matching(cfg: ml_collections.ConfigDict, student: Student):
    """Flow matching: t ~ U[t_min, 1] or logit-normal (SD3) clipped to [t_min, 1]."""
    o = read_options(
        cfg, FLOW_MATCHING_DEFAULTS, "flow_matching", {"t_sampling": ("uniform", "logit_normal")}
    )
    t_min, sampling = float(o["t_min"]), o["t_sampling"]
    mu, std = float(o["logit_mean"]), float(o["logit_std"])
    p_drop = float(o["label_dropout"])

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        k_t, k = jax.random.split(rng)
        n = batch["x"].shape[0]
        if sampling == "uniform":
            t = jax.random.uniform(k_t, (n,), jnp.float32, t_min, 1.0)
        else:
            t = jnp.clip(jax.nn.sigmoid(mu + std * jax.random.normal(k_t, (n,))), t_min, 1.0)
        return _regression(student, params, batch, t, k, p_drop)

    return term


@register("diffusion")
def diffusion(cfg: ml_collections.ConfigDict, student: Student):
    """Diffusion objective in the network's prediction kind (eps / v / x0) on its path."""
    o = read_options(cfg, DIFFUSION_DEFAULTS, "diffusion", {"t_sampling": ("uniform", "discrete")})
    if student.prediction not in ("eps", "v", "x0", "flow"):
        raise ValueError(f"diffusion loss: unsupported prediction {student.prediction!r}")
    t_min, sampling = float(o["t_min"]), o["t_sampling"]
    if sampling == "discrete" and not hasattr(student.path, "num_train_timesteps"):
        raise ValueError(f"diffusion.t_sampling='discrete' needs the ddpm path, got {student.path.name!r}")
    p_drop = float(o["label_dropout"])

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        k_t, k = jax.random.split(rng)
        n = batch["x"].shape[0]
        if sampling == "discrete":
            big_t = student.path.num_train_timesteps
            t = student.path.timestep_to_t(jax.random.randint(k_t, (n,), 0, big_t))
        else:
            t = jax.random.uniform(k_t, (n,), jnp.float32, t_min, 1.0)
        return _regression(student, params, batch, t, k, p_drop)

    return term


__all__ = ["DIFFUSION_DEFAULTS", "FLOW_MATCHING_DEFAULTS", "diffusion", "drop_labels", "flow_matching"]
