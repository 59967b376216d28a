"""Distribution matching: TDM (trajectory distribution matching) and the DMD / DMD2 baselines.

Two networks train in one step (DESIGN.md "Losses"): the generator (the student) and an
auxiliary *fake score* ``f_psi`` that tracks the generator's own distribution. Each has its own
terms, differentiated only w.r.t. its own params; the other network is a constant.

Registered terms (config keys and defaults in ``*_DEFAULTS`` below):

* ``"tdm"`` (generator, METHODS.md 4.3 step 5): backward-simulate the current K-step student
  from noise (no gradient through the chain), pick a step ``j`` per sample, predict
  ``(x0_hat, eps_hat)`` there (with gradient), DDIM-hop to the interval's low end ``t_mid``, diffuse
  to ``tau`` inside the step's interval, and pull ``x0_hat`` along ``x0_real_cfg - x0_fake`` with
  the surrogate ``mean(d(x0_hat, sg(x0_hat - (x0_fake - x0_real_cfg))) / wf)``,
  ``wf = mean_D |x0_hat - x0_real_cfg| + eps`` per sample, ``d`` squared or pseudo-Huber
  (elementwise, c = 1e-3, as the demo). CFG (Imagen scale ``guidance``) is baked into the target.
* ``"tdm_fake"`` (fake score, step 4): denoising regression of ``f_psi(x_tau, tau)`` on the student's
  detached ``x0_hat``, weight ``min(SNR(tau), 5) * w_IS`` with the demo's importance weight
  computed in log space and clipped (:func:`importance_log_weight`).
* ``"dmd"`` (generator, METHODS.md 5.5): one-step ``x = G(z)``, ``x_t`` at ``t ~ U[t_min, t_max]``,
  ``grad = (x0_fake - x0_real) / (mean_D |x - x0_real| + eps)``, ``L = 0.5 mean(|x - sg(x - grad)|^2)``;
  optional regression ``reg_weight * mean|G(noise) - x|^2`` on teacher pairs ``batch["x"]``.
* ``"dmd_fake"`` (fake score): ``mean(w(t) |f_psi(x_t, t) - sg(x)|^2)``, DMD2's 'karras' weight
  ``1/sigma_edm^2 + 1/sigma_data^2`` by default.

Sampling-steps-aware TDM: ``num_steps`` a tuple of K (e.g. (1, 2, 4)); K is drawn per sample and
its index in the tuple is fed as ``num_steps=`` to both the student and the fake score (their
models need ``num_step_classes = len(num_steps)``). Time grids: :mod:`fewstep_jax.tdm_schedule`.

What the engine provides: ``inputs.student`` (student wrapper), ``inputs.net("fake")`` (fake-score
wrapper, a :class:`Student` whose ``x0_eps`` is used), ``inputs.others["fake"]`` for generator
terms and ``inputs.others["student"]`` for fake terms; batch ``{"noise": (B, ...), "label": (B,)?}``.

Teacher cost (metric ``teacher_nfe`` of ``tdm`` / ``dmd``): one teacher ``x0`` per example, two
with ``guidance != 1`` (CFG baked into the target); the fake terms never call the teacher.

Degenerate normaliser guard (``tdm`` / ``dmd``, METHODS.md pitfall 13): the per-sample gradient
scale ``mean_D |x0_fake - x0_real| / (wf + eps)`` (the size of the normalised DM direction; O(1)
when the normaliser is healthy) above ``max_grad_scale``, or a finite normaliser ``wf`` above
``max_normalizer`` (the student's sample or the teacher's target has run away), makes the term's
loss NaN and sets its flag ``nonfinite/normalizer``: the train loop stops naming
``<term>/normalizer`` (or skips the step with ``train.skip_nonfinite``). Metrics
``grad_scale_max`` and ``normalizer_max`` show how close a run is; None disables a check.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fewstep_jax.losses.api import LossInputs, register, teacher_evals_per_call
from fewstep_jax.losses.distances import elementwise
from fewstep_jax.paths import Path, bcast, edm_sigma
from fewstep_jax.students import Student
from fewstep_jax.tdm_schedule import TDM_SCHEDULE_DEFAULTS, TDMSchedule, make_schedule

Array = jax.Array
sg = jax.lax.stop_gradient

DISTANCES = ("l2", "pseudo_huber")
FAKE_WEIGHTINGS = ("karras", "snr_clip", "none")

# keys of a term block that belong to the train step, not to the term
ENGINE_KEYS = frozenset({"weight", "name", "net", "network", "every", "update_every"})

# degenerate-normaliser limits of the generator terms (module doc); None disables a check. Full
# gmm8 runs (tdm, tdm_k1, tdm_unify, dmd, dmd2: 2000 steps x 256) peak at grad_scale_max 620
# (p99 of the per-step max ~100) and normalizer_max 3.6: the defaults leave a 16x margin
NORMALIZER_GUARD = {"max_grad_scale": 1e4, "max_normalizer": 1e4}

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


def resolve_config(cfg, defaults: Mapping, term: str) -> dict:
    """The term's hyper-parameters: ``defaults`` overridden by ``cfg``; unknown keys are an error."""
    given = dict(cfg.items()) if cfg is not None else {}
    unknown = sorted(set(given) - set(defaults) - ENGINE_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for loss term {term!r}; known: {sorted(defaults)}")
    out = dict(defaults)
    out.update({k: v for k, v in given.items() if k in defaults})
    return out


# ---------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------


def _mean_dims(x: Array) -> Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def importance_log_weight(eps_mix: Array, z: Array, clip: float | None = 10.0) -> Array:
    """``log w_IS = -0.5 mean_D(eps_mix^2) + 0.5 mean_D(z^2)``, clipped to ``[-clip, clip]``; (B,).

    The demo's ``exp(-0.5 mean(eps_mix^2)) / exp(-0.5 mean(z^2))`` (per-dimension *mean*, not the
    Gaussian log-density) in log space, so it cannot under/overflow (METHODS.md pitfall 13).
    """
    logw = -0.5 * _mean_dims(eps_mix * eps_mix) + 0.5 * _mean_dims(z * z)
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


def _normalizer(x: Array, x_real: Array, eps: float) -> tuple[Array, Array, Array]:
    """``(1 / (mean_D |x - x_real| + eps) or 0 where non-finite, raw normaliser, finite flag)``, (B,)."""
    wf = sg(_mean_dims(jnp.abs(x - x_real)))
    finite = jnp.isfinite(wf)
    inv = jnp.where(finite, 1.0 / (jnp.where(finite, wf, 1.0) + eps), 0.0)
    return inv, wf, finite


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
    distribution-matching direction ``x0_fake - x0_real`` (METHODS.md 4.3, step 5).
    ``max_grad_scale`` / ``max_normalizer``: see :func:`guard_normalizer` (None: no check).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    x0_fake, x0_real = sg(x0_fake), sg(x0_real)
    direction = sg(_finite_or_zero(x0_fake - x0_real))
    inv, wf, finite = _normalizer(x0_hat, x0_real, eps)
    r = x0_hat - sg(x0_hat - direction)
    per = elementwise(r, distance, huber_c)
    loss = jnp.mean(per * bcast(inv, per))
    m = _dm_metrics(direction, wf, finite, x0_fake - x0_real)
    return guard_normalizer(loss, m, direction, inv, wf, finite, max_grad_scale, max_normalizer)


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
    (DMD2's ``nan_to_num``). ``max_grad_scale`` / ``max_normalizer``: see :func:`guard_normalizer`.
    """
    x0_fake, x0_real = sg(x0_fake), sg(x0_real)
    inv, wf, finite = _normalizer(x, x0_real, eps)
    direction = sg(_finite_or_zero(x0_fake - x0_real))
    grad = direction * bcast(inv, direction)
    r = x - sg(x - grad)
    m = _dm_metrics(direction, wf, finite, x0_fake - x0_real)
    loss = 0.5 * jnp.mean(r * r)
    return guard_normalizer(loss, m, direction, inv, wf, finite, max_grad_scale, max_normalizer)


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
    scale = _mean_dims(jnp.abs(direction)) * inv
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


def _dm_metrics(direction: Array, wf: Array, finite: Array, raw: Array) -> dict:
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


# ---------------------------------------------------------------------------------------------
# TDM sampling: backward simulation and the matched sample
# ---------------------------------------------------------------------------------------------


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
    ``i < j_b`` (METHODS.md pitfall 9: the chain is a constant).
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
    x_start = _prior(path, noise)
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


# ---------------------------------------------------------------------------------------------
# registered terms
# ---------------------------------------------------------------------------------------------


@register("tdm")
def tdm_loss(cfg, student: Student):
    """TDM generator term (see module doc); trains the student."""
    c = resolve_config(cfg, TDM_DEFAULTS, "tdm")
    sched = make_schedule(c, student.path)
    cond = _condition_on_steps(c, sched)
    guidance = float(c["guidance"])
    nfe = float(teacher_evals_per_call(guidance))
    guard = _guard(c)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        fparams = sg(inputs.others[c["fake"]])
        teacher = sg(inputs.teacher)
        noise, label = _batch(batch)
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
    c = resolve_config(cfg, TDM_FAKE_DEFAULTS, "tdm_fake")
    sched = make_schedule(c, student.path)
    cond = _condition_on_steps(c, sched)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        sparams = sg(inputs.others[c["student"]])
        noise, label = _batch(batch)
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
        err = _mean_dims((x0_f - q["x0_hat"]) ** 2)
        loss = jnp.mean(err * w)
        clip = c["log_weight_clip"]
        return loss, {
            "fake_mse": jnp.mean(err),
            "w_is_mean": jnp.mean(jnp.exp(logw)),
            "w_is_clipped": jnp.mean((jnp.abs(logw) >= clip).astype(jnp.float32)) if clip else jnp.zeros(()),
            "tau_mean": jnp.mean(q["tau"]),
        }

    return term


@register("dmd")
def dmd_loss(cfg, student: Student):
    """DMD / DMD2 one-step generator term (see module doc)."""
    c = resolve_config(cfg, DMD_DEFAULTS, "dmd")
    _check_range(c, "dmd")
    guidance = float(c["guidance"])
    nfe = float(teacher_evals_per_call(guidance))
    guard = _guard(c)

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        fake = inputs.net(c["fake"])
        fparams = sg(inputs.others[c["fake"]])
        teacher = sg(inputs.teacher)
        noise, label = _batch(batch)
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
    c = resolve_config(cfg, DMD_FAKE_DEFAULTS, "dmd_fake")
    _check_range(c, "dmd_fake")
    if c["weighting"] not in FAKE_WEIGHTINGS:
        raise ValueError(f"dmd_fake weighting must be one of {FAKE_WEIGHTINGS}, got {c['weighting']!r}")

    def term(params, inputs: LossInputs, batch: dict, rng: Array):
        stu = inputs.student or student
        path = stu.path
        fake = inputs.net(c["fake"])
        sparams = sg(inputs.others[c["student"]])
        noise, label = _batch(batch)
        x = sg(stu(sparams, _start(path, noise, batch), c["t_start"], 0.0, label=label))
        x_t, t = _noisy(path, x, rng, c["t_min"], c["t_max"])
        x0_f = fake.x0_eps(params, x_t, t, label=label)[0]
        err = _mean_dims((x0_f - x) ** 2)
        if c["weighting"] == "karras":
            w = 1.0 / jnp.maximum(edm_sigma(path, t), 1e-6) ** 2 + 1.0 / c["sigma_data"] ** 2
        elif c["weighting"] == "snr_clip":
            a, s = path.alpha_sigma(t)
            w = jnp.minimum((a / jnp.maximum(s, 1e-12)) ** 2, c["snr_clip"])
        else:
            w = jnp.ones_like(t)
        return jnp.mean(w * err), {"fake_mse": jnp.mean(err)}

    return term


def _batch(batch: dict) -> tuple[Array, Array | None]:
    if "noise" not in batch:
        raise ValueError(f"distribution-matching terms need batch['noise']; the batch has {sorted(batch)}")
    return batch["noise"], batch.get("label")


def _prior(path: Path, noise: Array) -> Array:
    # sigma(1) * eps as Teacher.prior (path.prior_scale is a Python float, not traceable)
    return noise * path.sigma(jnp.ones((), jnp.float32))


def _start(path: Path, noise: Array, batch: dict) -> Array:
    """The one-step generator's input: a batch of teacher pairs (``"x"`` present, see
    fewstep_jax.reflow) holds the teacher's prior sample itself, a noise batch N(0, I)."""
    return jnp.asarray(noise, jnp.float32) if "x" in batch else _prior(path, noise)


def _noisy(path: Path, x: Array, rng: Array, t_min: float, t_max: float) -> tuple[Array, Array]:
    r_t, r_n = jax.random.split(rng)
    t = jax.random.uniform(r_t, (x.shape[0],), minval=t_min, maxval=t_max)
    return path.interpolate(x, jax.random.normal(r_n, x.shape, x.dtype), t), t


def _guard(c: dict) -> tuple[float | None, float | None]:
    """``(max_grad_scale, max_normalizer)`` of a generator term's config (None: no check)."""
    out = []
    for key in ("max_grad_scale", "max_normalizer"):
        v = c[key]
        if v is not None and not float(v) > 0:
            raise ValueError(f"{key} must be > 0 or None (no check), got {v!r}")
        out.append(None if v is None else float(v))
    return out[0], out[1]


def _check_range(c: dict, term: str) -> None:
    if not 0.0 <= c["t_min"] < c["t_max"] <= 1.0:
        raise ValueError(f"{term}: need 0 <= t_min < t_max <= 1, got t_min={c['t_min']}, t_max={c['t_max']}")


__all__ = [
    "DMD_DEFAULTS",
    "DMD_FAKE_DEFAULTS",
    "NORMALIZER_GUARD",
    "TDM_DEFAULTS",
    "TDM_FAKE_DEFAULTS",
    "backward_simulate",
    "diffuse",
    "dmd_surrogate",
    "guard_normalizer",
    "importance_log_weight",
    "resolve_config",
    "tdm_sample",
    "tdm_surrogate",
]
