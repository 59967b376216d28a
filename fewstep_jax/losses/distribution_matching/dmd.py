"""DMD / DMD2: the one-step generator and fake-score terms (docs/methods.md §5.5).

* ``"dmd"`` (generator): one-step ``x = G(z)``, ``x_t`` at ``t ~ U[t_min, t_max]``,
  ``grad = (x0_fake - x0_real) / (mean_D |x - x0_real| + eps)``, ``L = 0.5 mean(|x - sg(x - grad)|^2)``;
  optional regression ``reg_weight * mean|G(noise) - x|^2`` on teacher pairs ``batch["x"]`` (DMD v1).
* ``"dmd_fake"`` (fake score): ``mean(w(t) |f_psi(x_t, t) - sg(x)|^2)``, DMD2's 'karras' weight
  ``1/sigma_edm^2 + 1/sigma_data^2`` by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.distribution_matching.common import (
    NORMALIZER_GUARD,
    dm_metrics,
    finite_or_zero,
    guard_limits,
    guard_normalizer,
    mean_dims,
    noise_batch,
    normalizer,
    prior,
    sg,
)
from fewstep_jax.losses.options import read_options
from fewstep_jax.paths import Path, bcast, edm_sigma
from fewstep_jax.students import Student

Array = jax.Array

FAKE_WEIGHTINGS = ("karras", "snr_clip", "none")

DMD_DEFAULTS = {
    "t_start": 1.0,  # the one-step generator maps noise at t_start to data
    "t_min": 0.02,
    "t_max": 0.98,
    "guidance": 1.0,
    "normalizer_eps": 1e-6,
    **NORMALIZER_GUARD,
    "reg_weight": 0.0,  # DMD v1 regression on teacher pairs batch["x"] (0.25 with LPIPS in the paper)
    "fake": "fake",
}
DMD_FAKE_DEFAULTS = {
    "t_start": 1.0,
    "t_min": 0.001,
    "t_max": 0.999,
    "weighting": "karras",
    "sigma_data": 0.5,
    "snr_clip": 5.0,
    "fake": "fake",
    "student": "student",
}


def dmd_surrogate(
    x: Array,
    x0_fake: Array,
    x0_real: Array,
    eps: float = 1e-6,
    max_grad_scale: float | None = None,
    max_normalizer: float | None = None,
) -> tuple[Array, dict]:
    """DMD2's generator surrogate ``0.5 mean(|x - sg(x - grad)|^2)`` (dL/dx = grad / (B * D)).

    ``grad = (x0_fake - x0_real) / (mean_D |x - x0_real| + eps)``, non-finite entries set to 0
    (DMD2's ``nan_to_num``). ``max_grad_scale`` / ``max_normalizer``: see
    :func:`.common.guard_normalizer`.
    """
    x0_fake, x0_real = sg(x0_fake), sg(x0_real)
    inv, wf, finite = normalizer(x, x0_real, eps)
    direction = sg(finite_or_zero(x0_fake - x0_real))
    grad = direction * bcast(inv, direction)
    r = x - sg(x - grad)
    m = dm_metrics(direction, wf, finite, x0_fake - x0_real)
    loss = 0.5 * jnp.mean(r * r)
    return guard_normalizer(loss, m, direction, inv, wf, finite, max_grad_scale, max_normalizer)


def _start(path: Path, noise: Array, batch: dict) -> Array:
    """The one-step generator's input: a batch of teacher pairs (``"x"`` present, see
    fewstep_jax.teachers.pairs) holds the teacher's prior sample itself, a noise batch N(0, I)."""
    return jnp.asarray(noise, jnp.float32) if "x" in batch else prior(path, noise)


def _noisy(path: Path, x: Array, rng: Array, t_min: float, t_max: float) -> tuple[Array, Array]:
    r_t, r_n = jax.random.split(rng)
    t = jax.random.uniform(r_t, (x.shape[0],), minval=t_min, maxval=t_max)
    return path.interpolate(x, jax.random.normal(r_n, x.shape, x.dtype), t), t


def _check_range(c: dict, term: str) -> None:
    if not 0.0 <= c["t_min"] < c["t_max"] <= 1.0:
        raise ValueError(f"{term}: need 0 <= t_min < t_max <= 1, got t_min={c['t_min']}, t_max={c['t_max']}")


@register("dmd")
def dmd_loss(cfg, student: Student):
    """DMD / DMD2 one-step generator term (see module doc)."""
    c = read_options(cfg, DMD_DEFAULTS, "dmd")
    _check_range(c, "dmd")
    guidance = float(c["guidance"])
    nfe = float(teacher_evals_per_call(guidance))
    guard = guard_limits(c)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        fake = inputs.net(c["fake"])
        fparams = sg(inputs.others[c["fake"]])
        teacher = sg(inputs.teacher)
        noise, label = noise_batch(batch)
        x = stu(params, _start(stu.path, noise, batch), c["t_start"], 0.0, label=label)
        x_t, t = _noisy(stu.path, sg(x), rng, c["t_min"], c["t_max"])
        x0_real = sg(teacher.x0_eps(x_t, t, label, guidance)[0])
        x0_fake = sg(fake.x0_eps(fparams, x_t, t, label=label)[0])
        loss, m = dmd_surrogate(x, x0_fake, x0_real, c["normalizer_eps"], *guard)
        m["teacher_nfe"] = nfe
        if c["reg_weight"] > 0:
            if "x" not in batch:
                raise ValueError("dmd with reg_weight > 0 needs teacher pairs: batch['x'] for batch['noise']")
            reg = jnp.mean((x - batch["x"]) ** 2)
            loss = loss + c["reg_weight"] * reg
            m["regression"] = reg
        return loss, m

    return term


@register("dmd_fake")
def dmd_fake_loss(cfg, student: Student):
    """DMD2 fake-score term: denoising on the generator's detached samples (see module doc)."""
    c = read_options(cfg, DMD_FAKE_DEFAULTS, "dmd_fake", {"weighting": FAKE_WEIGHTINGS})
    _check_range(c, "dmd_fake")

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        sparams = sg(inputs.others[c["student"]])
        noise, label = noise_batch(batch)
        x = sg(stu(sparams, _start(path, noise, batch), c["t_start"], 0.0, label=label))
        x_t, t = _noisy(path, x, rng, c["t_min"], c["t_max"])
        x0_f = fake.x0_eps(params, x_t, t, label=label)[0]
        err = mean_dims((x0_f - x) ** 2)
        if c["weighting"] == "karras":
            w = 1.0 / jnp.maximum(edm_sigma(path, t), 1e-6) ** 2 + 1.0 / c["sigma_data"] ** 2
        elif c["weighting"] == "snr_clip":
            a, s = path.alpha_sigma(t)
            w = jnp.minimum((a / jnp.maximum(s, 1e-12)) ** 2, c["snr_clip"])
        else:
            w = jnp.ones_like(t)
        return jnp.mean(w * err), {"fake_mse": jnp.mean(err)}

    return term


__all__ = [
    "DMD_DEFAULTS",
    "DMD_FAKE_DEFAULTS",
    "FAKE_WEIGHTINGS",
    "dmd_fake_loss",
    "dmd_loss",
    "dmd_surrogate",
]
