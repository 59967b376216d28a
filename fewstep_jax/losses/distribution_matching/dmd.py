"""DMD / DMD2: the one-step generator and fake-score terms (docs/methods.md §5.5).

* ``"dmd"`` (generator): one-step ``x = G(z)``, ``x_t`` at a noise level drawn by ``time_sampler``,
  ``grad = (x0_fake - x0_real) / (mean_D |x - x0_real| + eps)``, ``L = 0.5 mean(|x - sg(x - grad)|^2)``;
  optional regression ``reg_weight * mean|G(noise) - x|^2`` on teacher pairs ``batch["x"]`` (DMD v1).
* ``"dmd_fake"`` (fake score): ``mean(w(t) |f_psi(x_t, t) - sg(x)|^2)``, DMD2's 'karras' weight
  ``1/sigma_edm^2 + 1/sigma_data^2`` by default.

Noise levels (``time_sampler``): ``"karras"`` is DMD2's: an index uniform over
``{floor(t_min T) .. min(floor(t_max T), T - 1)}`` of its ``T = karras_points`` (1000) point Karras
grid (EDM noise levels ``sigma_min .. sigma_max``, ``rho``; ascending, capped at the path's own
maximum as :func:`fewstep_jax.solvers.edm_grid`), e.g. ``t_min, t_max = 0.02, 0.98`` -> indices
20..980 for the generator and ``0, 1`` -> 0..999 for the fake score; ``"uniform"``: ``t ~ U[t_min, t_max]``
in the path's time (this project's draw before issue 16, kept as a labelled variant; the default
of the terms, so the recipes name the faithful one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax import solvers
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
TIME_SAMPLERS = ("uniform", "karras")
# DMD2's Karras grid (tianweiy/DMD2 main/edm/edm_guidance.py: 1000 points, sigma 0.002..80, rho 7)
KARRAS = {"time_sampler": "uniform", "karras_points": 1000, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}

DMD_DEFAULTS = {
    "t_start": 1.0,  # the one-step generator maps noise at t_start to data
    "t_min": 0.02,
    "t_max": 0.98,
    "guidance": 1.0,
    "normalizer_eps": 1e-6,
    **NORMALIZER_GUARD,
    "reg_weight": 0.0,  # DMD v1 regression on teacher pairs batch["x"] (0.25 with LPIPS in the paper)
    "fake": "fake",
    **KARRAS,
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
    **KARRAS,
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


def karras_times(path: Path, c: dict) -> tuple[np.ndarray, int, int]:
    """DMD2's Karras grid as times of ``path`` (T,), ascending in noise (index 0 = ``sigma_min``),
    and the inclusive index range ``[floor(t_min T), min(floor(t_max T), T - 1)]`` its draws use."""
    T = int(c["karras_points"])
    if T < 2:
        raise ValueError(f"karras_points must be >= 2, got {T}")
    times = solvers.edm_grid(T, path, c["sigma_min"], c["sigma_max"], c["rho"], start_at_one=False)[:-1][::-1]
    lo, hi = int(c["t_min"] * T), min(int(c["t_max"] * T), T - 1)
    return np.ascontiguousarray(times), lo, hi


def _time_sampler(path: Path, c: dict, term: str):
    """``draw(rng, B) -> t (B,)`` by the term's ``time_sampler`` (module doc)."""
    if not 0.0 <= c["t_min"] < c["t_max"] <= 1.0:
        raise ValueError(f"{term}: need 0 <= t_min < t_max <= 1, got t_min={c['t_min']}, t_max={c['t_max']}")
    if c["time_sampler"] == "uniform":
        return lambda rng, B: jax.random.uniform(rng, (B,), minval=c["t_min"], maxval=c["t_max"])
    times, lo, hi = karras_times(path, c)
    grid = jnp.asarray(times)
    return lambda rng, B: grid[jax.random.randint(rng, (B,), lo, hi + 1)]


def _noisy(path: Path, x: Array, rng: Array, draw) -> tuple[Array, Array]:
    r_t, r_n = jax.random.split(rng)
    t = draw(r_t, x.shape[0])
    return path.interpolate(x, jax.random.normal(r_n, x.shape, x.dtype), t), t


@register("dmd")
def dmd_loss(cfg, student: Student):
    """DMD / DMD2 one-step generator term (see module doc)."""
    c = read_options(cfg, DMD_DEFAULTS, "dmd", {"time_sampler": TIME_SAMPLERS})
    draw = _time_sampler(student.path, c, "dmd")
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
        x_t, t = _noisy(stu.path, sg(x), rng, draw)
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
    c = read_options(
        cfg, DMD_FAKE_DEFAULTS, "dmd_fake", {"weighting": FAKE_WEIGHTINGS, "time_sampler": TIME_SAMPLERS}
    )
    draw = _time_sampler(student.path, c, "dmd_fake")

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        sparams = sg(inputs.others[c["student"]])
        noise, label = noise_batch(batch)
        x = sg(stu(sparams, _start(path, noise, batch), c["t_start"], 0.0, label=label))
        x_t, t = _noisy(path, x, rng, draw)
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
    "KARRAS",
    "TIME_SAMPLERS",
    "dmd_fake_loss",
    "dmd_loss",
    "dmd_surrogate",
    "karras_times",
]
