"""TDM, trajectory distribution matching: the generator and fake-score terms (docs/methods.md §4.3, §4.4).

* ``"tdm"`` (generator, §4.3 step 5): backward-simulate the current K-step student from noise (no
  gradient through the chain), pick a step ``j`` per sample, predict ``(x0_hat, eps_hat)`` there
  (with gradient), DDIM-hop to the interval's low end ``t_mid``, diffuse to ``tau`` inside the
  step's interval, and pull ``x0_hat`` along ``x0_real_cfg - x0_fake`` with the surrogate
  ``mean(d(x0_hat, sg(x0_hat - (x0_fake - x0_real_cfg))) / wf)``, ``wf = mean_D |x0_hat -
  x0_real_cfg| + eps`` per sample, ``d`` squared or pseudo-Huber (elementwise, c = 1e-3, as the
  demo). CFG (Imagen scale ``guidance``) is baked into the target.
* ``"tdm_fake"`` (fake score, step 4): denoising regression of ``f_psi(x_tau, tau)`` on the
  student's detached ``x0_hat``, weight ``min(SNR(tau), 5) * w_IS`` with the demo's importance
  weight computed in log space and clipped (:func:`importance_log_weight`).

Sampling-steps-aware TDM (§4.4): ``num_steps`` a tuple of K (e.g. (1, 2, 4)); K is drawn per
sample and its index in the tuple is fed as ``num_steps=`` to both the student and the fake score
(their models need ``num_step_classes = len(num_steps)``). Time grids: :mod:`fewstep_jax.schedules.tdm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewstep_jax.losses import distances
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
from fewstep_jax.paths import Path, bcast
from fewstep_jax.schedules.tdm import TDM_SCHEDULE_DEFAULTS, TDMSchedule, make_schedule
from fewstep_jax.students import Student

Array = jax.Array

TDM_DISTANCES = distances.allowed("l2", "pseudo_huber")

TDM_DEFAULTS = {
    **TDM_SCHEDULE_DEFAULTS,
    "guidance": 1.0,  # Imagen CFG scale baked into the target (demo --cfg 4.5)
    "distance": "pseudo_huber",  # --use_huber; or "l2"
    "huber_c": 1e-3,  # elementwise pseudo-Huber constant of the demo
    "normalizer_eps": 1e-6,
    **NORMALIZER_GUARD,
    "condition_on_steps": "auto",  # feed num_steps=k_index to student and fake; auto: len(num_steps) > 1
    "fake": "fake",  # name of the fake-score network
}
TDM_FAKE_DEFAULTS = {
    **TDM_SCHEDULE_DEFAULTS,
    "snr_clip": 5.0,
    "importance_weight": True,
    "log_weight_clip": 10.0,
    "condition_on_steps": "auto",
    "fake": "fake",
    "student": "student",  # name of the generator in inputs.others
}


def importance_log_weight(eps_mix: Array, z: Array, clip: float | None = 10.0) -> Array:
    """``log w_IS = -0.5 mean_D(eps_mix^2) + 0.5 mean_D(z^2)``, clipped to ``[-clip, clip]``; (B,).

    The demo's ``exp(-0.5 mean(eps_mix^2)) / exp(-0.5 mean(z^2))`` (per-dimension *mean*, not the
    Gaussian log-density) in log space, so it cannot under/overflow (docs/methods.md pitfall 13).
    """
    logw = -0.5 * mean_dims(eps_mix * eps_mix) + 0.5 * mean_dims(z * z)
    return logw if clip is None else jnp.clip(logw, -clip, clip)


def diffuse(path: Path, x_mid: Array, eps_mid: Array, t_mid: Array, tau: Array, z: Array):
    """Forward-diffuses ``x_mid`` at ``t_mid`` to ``tau >= t_mid`` with fresh noise ``z``.

    ``x_tau = (a_tau / a_mid) x_mid + beta z``, ``beta = sqrt(s_tau^2 - (a_tau s_mid / a_mid)^2)``,
    and ``eps_mix`` with ``x_tau = a_tau x0 + s_tau eps_mix`` when ``x_mid = a_mid x0 + s_mid eps_mid``.
    Returns ``(x_tau, eps_mix)``, shapes of ``x_mid``.
    """
    a_m, s_m = path.alpha_sigma(t_mid)
    a_t, s_t = path.alpha_sigma(tau)
    ratio = a_t / jnp.maximum(a_m, 1e-12)
    beta = jnp.sqrt(jnp.maximum(s_t * s_t - (ratio * s_m) ** 2, 0.0))
    x_tau = bcast(ratio, x_mid) * x_mid + bcast(beta, z) * z
    eps_mix = (bcast(ratio * s_m, x_mid) * eps_mid + bcast(beta, z) * z) / bcast(jnp.maximum(s_t, 1e-12), z)
    return x_tau, eps_mix


def tdm_surrogate(
    x0_hat: Array,
    x0_fake: Array,
    x0_real: Array,
    distance: str = "pseudo_huber",
    huber_c: float = 1e-3,
    eps: float = 1e-6,
    max_grad_scale: float | None = None,
    max_normalizer: float | None = None,
) -> tuple[Array, dict]:
    """TDM's generator surrogate; gradient reaches ``x0_hat`` only (fake/real are constants).

    ``r = x0_hat - sg(x0_hat - (x0_fake - x0_real))`` (value ``x0_fake - x0_real``, non-finite
    entries set to 0), ``L = mean_{b,D}(d(r) / wf_b)`` with ``d = r^2`` or
    ``sqrt(r^2 + c^2) - c``. Hence ``dL/dx0_hat = d'(r) / (wf_b * B * D)``: the (normalised)
    distribution-matching direction ``x0_fake - x0_real`` (docs/methods.md §4.3, step 5).
    ``max_grad_scale`` / ``max_normalizer``: see :func:`.common.guard_normalizer` (None: no check).
    """
    if distance not in TDM_DISTANCES:
        raise ValueError(f"distance must be one of {TDM_DISTANCES}, got {distance!r}")
    x0_fake, x0_real = sg(x0_fake), sg(x0_real)
    direction = sg(finite_or_zero(x0_fake - x0_real))
    inv, wf, finite = normalizer(x0_hat, x0_real, eps)
    r = x0_hat - sg(x0_hat - direction)
    per = distances.elementwise(r, distance, huber_c)
    loss = jnp.mean(per * bcast(inv, per))
    m = dm_metrics(direction, wf, finite, x0_fake - x0_real)
    return guard_normalizer(loss, m, direction, inv, wf, finite, max_grad_scale, max_normalizer)


def backward_simulate(
    student: Student,
    params,
    x: Array,
    kidx: Array,
    j: Array,
    sched: TDMSchedule,
    label: Array | None = None,
    num_steps: Array | None = None,
) -> Array:
    """The input of step ``j`` (B,) of each sample's K-step chain from ``x`` at ``t_max``; no gradient.

    Runs ``Kmax - 1`` student hops ``G(x, start_i, start_{i+1})``; sample b keeps hop i only when
    ``i < j_b`` (docs/methods.md pitfall 9: the chain is a constant).
    """
    params = sg(params)
    for i in range(sched.max_steps - 1):
        t_i, t_n = (sched.to_t(u) for u in sched.hop_times(kidx, i))
        x_new = student(params, x, t_i, t_n, label=label, num_steps=num_steps)
        x = jnp.where(bcast(i < j, x), x_new, x)
    return sg(x)


def tdm_sample(
    student: Student,
    params,
    sched: TDMSchedule,
    noise: Array,
    rng: Array,
    label: Array | None = None,
    condition_on_steps: bool = False,
) -> dict:
    """Draws K, the step, ``t_mid`` and ``tau`` and predicts ``(x0_hat, eps_hat)`` at the step input.

    ``x0_hat``/``eps_hat`` are differentiable w.r.t. ``params`` (through this one call only).
    Returns a dict: ``x0_hat, eps_hat`` (B, ...), ``t, t_mid, tau`` (B,) times, ``k_index, step``
    (B,) int32, ``num_steps`` (the condition passed to the networks, or None).
    """
    path = student.path
    r_steps, r_times = jax.random.split(rng)
    kidx, j, start, low = sched.sample_steps(r_steps, noise.shape[0])
    mid, tau = sched.sample_mid_tau(r_times, start, low)
    ns = kidx if condition_on_steps else None
    x_start = prior(path, noise)
    x_j = backward_simulate(student, params, x_start, kidx, j, sched, label, ns)
    t, t_mid = sched.to_t(start), sched.to_t(mid)
    x0_hat, eps_hat = student.x0_eps(params, x_j, t, s=t_mid, label=label, num_steps=ns)
    return {
        "x0_hat": x0_hat,
        "eps_hat": eps_hat,
        "t": t,
        "t_mid": t_mid,
        "tau": sched.to_t(tau),
        "k_index": kidx,
        "step": j,
        "num_steps": ns,
    }


def _matched_noisy(path: Path, q: dict, z: Array) -> tuple[Array, Array]:
    """``(x_tau, eps_mix)`` of the DDIM hop to ``t_mid`` of the detached prediction, then diffusion."""
    x0, eps = sg(q["x0_hat"]), sg(q["eps_hat"])
    x_mid = path.interpolate(x0, eps, q["t_mid"])
    return diffuse(path, x_mid, eps, q["t_mid"], q["tau"], z)


def _condition_on_steps(c: dict, sched: TDMSchedule) -> bool:
    mode = c["condition_on_steps"]
    return len(sched.steps_set) > 1 if mode == "auto" else bool(mode)


@register("tdm")
def tdm_loss(cfg, student: Student):
    """TDM generator term (see module doc); trains the student."""
    c = read_options(cfg, TDM_DEFAULTS, "tdm", {"distance": TDM_DISTANCES})
    sched = make_schedule(c, student.path)
    cond = _condition_on_steps(c, sched)
    guidance = float(c["guidance"])
    nfe = float(teacher_evals_per_call(guidance))
    guard = guard_limits(c)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        fparams = sg(inputs.others[c["fake"]])
        teacher = sg(inputs.teacher)
        noise, label = noise_batch(batch)
        r_q, r_z = jax.random.split(rng)
        q = tdm_sample(stu, params, sched, noise, r_q, label, cond)
        z = jax.random.normal(r_z, noise.shape, noise.dtype)
        x_tau, _ = _matched_noisy(path, q, z)
        x0_real = sg(teacher.x0_eps(x_tau, q["tau"], label, guidance)[0])
        x0_fake = sg(fake.x0_eps(fparams, x_tau, q["tau"], label=label, num_steps=q["num_steps"])[0])
        loss, m = tdm_surrogate(
            q["x0_hat"], x0_fake, x0_real, c["distance"], c["huber_c"], c["normalizer_eps"], *guard
        )
        m.update(tau_mean=jnp.mean(q["tau"]), step_mean=jnp.mean(q["step"].astype(jnp.float32)))
        m["teacher_nfe"] = nfe
        return loss, m

    return term


@register("tdm_fake")
def tdm_fake_loss(cfg, student: Student):
    """TDM fake-score term (see module doc); trains the fake score on the student's detached outputs."""
    c = read_options(cfg, TDM_FAKE_DEFAULTS, "tdm_fake")
    sched = make_schedule(c, student.path)
    cond = _condition_on_steps(c, sched)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        sparams = sg(inputs.others[c["student"]])
        noise, label = noise_batch(batch)
        r_q, r_z = jax.random.split(rng)
        q = jax.tree.map(sg, tdm_sample(stu, sparams, sched, noise, r_q, label, cond))
        z = jax.random.normal(r_z, noise.shape, noise.dtype)
        x_tau, eps_mix = _matched_noisy(path, q, z)
        if c["importance_weight"]:
            logw = importance_log_weight(eps_mix, z, c["log_weight_clip"])
        else:
            logw = jnp.zeros(noise.shape[0])
        a, s = path.alpha_sigma(q["tau"])
        w = jnp.minimum((a / jnp.maximum(s, 1e-12)) ** 2, c["snr_clip"]) * jnp.exp(logw)
        x0_f = fake.x0_eps(params, x_tau, q["tau"], label=label, num_steps=q["num_steps"])[0]
        err = mean_dims((x0_f - q["x0_hat"]) ** 2)
        loss = jnp.mean(err * w)
        clip = c["log_weight_clip"]
        return loss, {
            "fake_mse": jnp.mean(err),
            "w_is_mean": jnp.mean(jnp.exp(logw)),
            "w_is_clipped": jnp.mean((jnp.abs(logw) >= clip).astype(jnp.float32)) if clip else jnp.zeros(()),
            "tau_mean": jnp.mean(q["tau"]),
        }

    return term


__all__ = [
    "TDM_DEFAULTS",
    "TDM_DISTANCES",
    "TDM_FAKE_DEFAULTS",
    "backward_simulate",
    "diffuse",
    "importance_log_weight",
    "tdm_fake_loss",
    "tdm_loss",
    "tdm_sample",
    "tdm_surrogate",
]
