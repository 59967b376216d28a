"""TDM and DMD generator and fake-score terms pinned against the equations (docs/methods.md §4.2-4.4,
§4.7, §5.5, pitfalls 5, 8-10, 13).

Each term runs on a small fixed noise batch with the exact Gaussian-mixture teacher
(tests/loss_reference.py) and tiny MLP generator and fake-score networks. The draws (the step,
``t_mid``, ``tau``, the fresh noise; DMD's ``t`` and noise) are reproduced from the term's key with
``jax.random``; the step tables (the demo's ``t_k = k total // K - 1``, ``t_mid = t_k - total // K + 1``,
or ``t_max (K - j) / K`` on continuous paths), the backward simulation, the DDIM hop, the forward
diffusion, the importance weight, the CFG-baked target and the normalisers are numpy float64 from
the equations. Gradients are compared with ``jax.grad`` of the same equations: the generator's only
through ``x0_hat`` of the chosen step (DMD: through ``G(z)``), the fake's only through its own network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewstep_jax.losses.api import get_factory
from tests import loss_reference as eqs
from tests.loss_reference import JX, NP, col

B = 16
RNG = jax.random.PRNGKey(3)
T = 1000


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def noise_batch(seed, dim=3):
    r = np.random.default_rng(seed)
    return {
        "noise": jnp.asarray(r.standard_normal((B, dim)).astype(np.float32)),
        "label": jnp.asarray(np.arange(B) % 3 - 1, jnp.int32),  # -1 (null), 0, 1
    }


def networks(path, pred, conditional, step_classes):
    """Generator and fake score: semilinear, no s input, the same tiny MLP family."""
    st = eqs.mlp_student(path, form="semilinear", prediction=pred, uses_s=False)
    nc = 2 if conditional else 0
    sp = eqs.mlp_init(21, num_classes=nc, step_classes=step_classes, scale=0.5)
    fp = eqs.mlp_init(22, num_classes=nc, step_classes=step_classes, scale=0.5)
    return st, sp, fp


def x0_eps_net(X_, p, rp, pred, x, t, label, ns):
    return eqs.to_x0_eps(rp, eqs.net(X_, p, x, t, None, label=label, num_steps=ns), pred, x, t, X_.xp)


# ---------------------------------------------------------------------------------------------
# TDM (docs/methods.md §4.3): step tables, draws, backward simulation, matched noisy sample
# ---------------------------------------------------------------------------------------------


def step_tables(steps_set, integer, total=900, t_max=1.0):
    """``(start, low)`` (S, Kmax) in units, rows padded with their last entry."""
    kmax = max(steps_set)
    starts, lows = [], []
    for K in steps_set:
        ks = np.arange(K, 0, -1)
        if integer:  # the demo: t_k = k total // K - 1, t_mid = t_k - total // K + 1
            start = ks * total // K - 1.0
            low = start - total // K + 1
        else:
            start, low = t_max * ks / K, t_max * (ks - 1) / K
        starts.append(np.concatenate([start, np.full(kmax - K, start[-1])]))
        lows.append(np.concatenate([low, np.full(kmax - K, low[-1])]))
    return np.stack(starts), np.stack(lows)


def tdm_draws(o, integer):
    """The term's draws, from its key: K index, step j ~ U{0..K-1}, t_mid, tau, the fresh noise z."""
    r_q, r_z = jax.random.split(RNG)
    r_steps, r_times = jax.random.split(r_q)
    rk, rj = jax.random.split(r_steps)
    steps = o["num_steps"]
    kidx = np.asarray(jax.random.randint(rk, (B,), 0, len(steps)))
    K = np.asarray(steps)[kidx]
    j = np.minimum(np.floor(np.asarray(jax.random.uniform(rj, (B,))) * K).astype(int), K - 1)
    start_tab, low_tab = step_tables(steps, integer)
    start, low = start_tab[kidx, j], low_tab[kidx, j]
    tau_min, margin, tau_max, mid_margin = (20.0, 10.0, 890.0, 20.0) if integer else (0.02, 0.01, 0.99, 0.02)
    rm, rt = jax.random.split(r_times)

    def uniform(key, lo, hi):  # float32 like the draw; integer units are the floor (randint)
        v = np.float32(lo) + np.asarray(jax.random.uniform(key, (B,))) * np.float32(hi - lo)
        return np.minimum(np.floor(v), hi - 1.0) if integer else v.astype(np.float64)

    mid = uniform(rm, low, start - mid_margin) if o.get("randmid") else low
    hi = start - margin if o.get("interval", "separate") == "separate" else np.full(B, tau_max)
    tau = uniform(rt, np.maximum(tau_min, mid), hi)
    z = np.asarray(jax.random.normal(r_z, (B, 3)), np.float64)
    to_t = (lambda u: (u + 1.0) / T) if integer else (lambda u: u)
    return {
        "kidx": kidx,
        "j": j,
        "start_tab": to_t(start_tab),
        "t": to_t(start),
        "t_mid": to_t(mid),
        "tau": to_t(tau),
        "z": z,
        "units": (start, low, mid, tau),
    }


def backward_simulation(rp, pred, p64, x, dr, label, ns):
    """Each sample's chain from noise: hops start_i -> start_{i+1} of the student (DDIM: the
    prediction at start_i mapped to start_{i+1}) while i < j; the input of step j."""
    kmax = dr["start_tab"].shape[1]
    for i in range(kmax - 1):
        t_i = dr["start_tab"][dr["kidx"], i]
        t_n = dr["start_tab"][dr["kidx"], min(i + 1, kmax - 1)]
        x0, eps = x0_eps_net(NP, p64, rp, pred, x, t_i, label, ns)
        x_new = eqs.interpolate(rp, x0, eps, t_n)
        x = np.where(col(i < dr["j"]), x_new, x)
    return x


def matched_noisy(rp, x0, eps, t_mid, tau, z):
    """DDIM hop of the prediction to t_mid, then forward diffusion to tau with fresh noise z:
    ``x_tau = (a_tau / a_mid) x_mid + beta z``, ``beta^2 = s_tau^2 - (a_tau s_mid / a_mid)^2``, and
    ``eps_mix`` with ``x_tau = a_tau x0 + s_tau eps_mix``."""
    a_m, s_m = rp.alpha_sigma(t_mid)
    a_t, s_t = rp.alpha_sigma(tau)
    x_mid = col(a_m) * x0 + col(s_m) * eps
    ratio = a_t / a_m
    beta = np.sqrt(s_t**2 - (ratio * s_m) ** 2)
    x_tau = col(ratio) * x_mid + col(beta) * z
    eps_mix = (col(ratio * s_m) * eps + col(beta) * z) / col(s_t)
    return x_tau, eps_mix


def tdm_constants(rp, pred, o, batch, sp, fp, integer, cond):
    dr = tdm_draws(o, integer)
    noise = np.asarray(batch["noise"], np.float64)
    label = np.asarray(batch["label"])
    ns = dr["kidx"] if cond else None
    _, s1 = rp.alpha_sigma(np.ones(1))
    sp64, fp64 = eqs.to_np(sp), eqs.to_np(fp)
    x_j = backward_simulation(rp, pred, sp64, s1 * noise, dr, label, ns)
    x0_hat, eps_hat = x0_eps_net(NP, sp64, rp, pred, x_j, dr["t"], label, ns)
    x_tau, eps_mix = matched_noisy(rp, x0_hat, eps_hat, dr["t_mid"], dr["tau"], dr["z"])
    x0_real = eqs.guided_x0_eps(rp, x_tau, dr["tau"], label, o.get("guidance", 1.0))[0]
    x0_fake = x0_eps_net(NP, fp64, rp, pred, x_tau, dr["tau"], label, ns)[0]
    return {
        **dr,
        "x_j": x_j,
        "x0_hat": x0_hat,
        "eps_hat": eps_hat,
        "x_tau": x_tau,
        "eps_mix": eps_mix,
        "x0_real": x0_real,
        "x0_fake": x0_fake,
        "label": label,
        "ns": ns,
    }


def tdm_gen_ref(X_, p, rp, pred, c, distance, huber_c):
    """``mean_{b,D}(d(r) / wf_b)``, ``r = x0_hat - sg(x0_hat - (x0_fake - x0_real_cfg))``,
    ``wf = mean_D |x0_hat - x0_real_cfg| + 1e-6`` (constant); x0_hat from the chain's constant input."""
    xp = X_.xp
    x0_hat = x0_eps_net(X_, p, rp, pred, c["x_j"], c["t"], c["label"], c["ns"])[0]
    direction = c["x0_fake"] - c["x0_real"]
    r = x0_hat - X_.sg(x0_hat - direction)
    per = r * r if distance == "l2" else xp.sqrt(r * r + huber_c**2) - huber_c
    return xp.mean(per / col(c["wf"], xp))


def tdm_fake_ref(X_, f, rp, pred, c):
    """``mean_b[mean_D (x0_fake(x_tau, tau) - x0_hat)^2 w_b]``, ``w`` from :func:`fake_weights`."""
    xp = X_.xp
    x0_f = x0_eps_net(X_, f, rp, pred, c["x_tau"], c["tau"], c["label"], c["ns"])[0]
    err = xp.mean((x0_f - c["x0_hat"]) ** 2, axis=1)
    return xp.mean(err * c["w"])


def fake_weights(rp, c, importance, clip, snr_clip=5.0):
    """``min(SNR(tau), 5) w_IS``, ``log w_IS = -mean_D(eps_mix^2)/2 + mean_D(z^2)/2`` clipped (the demo's
    per-dimension mean, not the Gaussian log-density)."""
    a, s = rp.alpha_sigma(c["tau"])
    logw = -0.5 * np.mean(c["eps_mix"] ** 2, 1) + 0.5 * np.mean(c["z"] ** 2, 1) if importance else np.zeros(B)
    if clip is not None:
        logw = np.clip(logw, -clip, clip)
    return np.minimum((a / s) ** 2, snr_clip) * np.exp(logw), logw


def jax_consts(c):
    out = {}
    for k, v in c.items():
        if k in ("kidx", "ns", "label") and v is not None:
            out[k] = jnp.asarray(v, jnp.int32)
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[k] = jnp.asarray(v, jnp.float32)
        else:
            out[k] = v
    return out


TDM_CASES = [
    # path, prediction, options, conditional
    ("ddpm_linear", "v", dict(guidance=3.0), True),  # the demo's integer grid, CFG baked in
    ("rf", "flow", dict(num_steps=(1, 2, 4), distance="l2", randmid=True), False),  # TDM-unify, K-conditioned
    ("rf", "flow", dict(num_steps=(3,), interval="overlap", guidance=2.0, huber_c=0.05), True),
]


def _tdm_setup(case):
    path_name, pred, opts, conditional = TDM_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    o = {"num_steps": (4,), **opts}
    cond = len(o["num_steps"]) > 1
    st, sp, fp = networks(path, pred, conditional, len(o["num_steps"]) if cond else 0)
    teacher = eqs.teacher_for(path)
    batch = noise_batch(case)
    c = tdm_constants(rp, pred, o, batch, sp, fp, path_name.startswith("ddpm"), cond)
    return rp, pred, o, st, sp, fp, teacher, batch, c


@pytest.mark.parametrize("case", range(len(TDM_CASES)))
def test_tdm_generator_value_and_gradient(case):
    rp, pred, o, st, sp, fp, teacher, batch, c = _tdm_setup(case)
    if case == 0:  # the demo's tables (pitfall 5)
        start, _, mid, tau = c["units"]
        assert set(np.unique(start)) <= {899.0, 674.0, 449.0, 224.0} and len(np.unique(start)) > 2
        np.testing.assert_array_equal(mid, start - 224)
        assert (
            np.all(tau >= np.maximum(20, mid)) and np.all(tau < start - 10) and np.all(tau == np.round(tau))
        )
    opts = {k: v for k, v in o.items()}
    term = get_factory("tdm")(cfg(**opts), st)
    tf = eqs.teacher_float_params(teacher)

    def run(s_, f_, tfl):
        inp = eqs.inputs(eqs.with_teacher_params(teacher, tfl), st, others={"fake": f_}, nets=(("fake", st),))
        return term(s_, inp, batch, RNG)

    (loss, m), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(sp, fp, tf)
    distance, huber_c = o.get("distance", "pseudo_huber"), o.get("huber_c", 1e-3)
    c["wf"] = np.mean(np.abs(c["x0_hat"] - c["x0_real"]), 1) + 1e-6
    want = tdm_gen_ref(NP, eqs.to_np(sp), rp, pred, c, distance, huber_c)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["dm_gap"]), np.mean(np.abs(c["x0_fake"] - c["x0_real"])), rtol=2e-5)
    np.testing.assert_allclose(float(m["tau_mean"]), np.mean(c["tau"]), rtol=1e-5)
    eqs.assert_all_zero(grads[1], "fake score")
    eqs.assert_all_zero(grads[2], "teacher")
    cj = jax_consts(c)
    g_want = jax.jit(jax.grad(lambda p: tdm_gen_ref(JX, p, rp, pred, cj, distance, huber_c)))(sp)
    eqs.assert_tree_close(grads[0], g_want, rtol=2e-4, atol=1e-7, what="tdm generator")
    eqs.assert_groups_nonzero(
        grads[0], list(sp), "tdm generator"
    )  # the step embedding too, when K-conditioned


@pytest.mark.parametrize("case, importance, clip", [(0, True, 10.0), (1, True, 0.05), (2, False, 10.0)])
def test_tdm_fake_value_and_gradient(case, importance, clip):
    rp, pred, o, st, sp, fp, teacher, batch, c = _tdm_setup(case)
    opts = {k: v for k, v in o.items() if k not in ("guidance", "distance", "huber_c")}
    term = get_factory("tdm_fake")(cfg(**opts, importance_weight=importance, log_weight_clip=clip), st)
    tf = eqs.teacher_float_params(teacher)

    def run(f_, s_, tfl):
        inp = eqs.inputs(
            eqs.with_teacher_params(teacher, tfl), st, others={"student": s_}, nets=(("fake", st),)
        )
        return term(f_, inp, batch, RNG)

    (loss, m), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(fp, sp, tf)
    c["w"], logw = fake_weights(rp, c, importance, clip)
    if importance:
        assert np.std(logw) > 1e-3  # the weight varies across the batch: switching it off is visible
    if clip == 0.05:
        assert np.any(np.abs(logw) == 0.05) and np.any(np.abs(logw) < 0.05)
    want = tdm_fake_ref(NP, eqs.to_np(fp), rp, pred, c)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["w_is_mean"]), np.mean(np.exp(logw)), rtol=2e-5)
    eqs.assert_all_zero(grads[1], "generator")
    eqs.assert_all_zero(grads[2], "teacher")
    cj = jax_consts(c)
    g_want = jax.jit(jax.grad(lambda f: tdm_fake_ref(JX, f, rp, pred, cj)))(fp)
    eqs.assert_tree_close(grads[0], g_want, rtol=2e-4, atol=1e-7, what="tdm fake")
    eqs.assert_groups_nonzero(grads[0], list(fp), "tdm fake")


# ---------------------------------------------------------------------------------------------
# DMD / DMD2 (docs/methods.md §5.5)
# ---------------------------------------------------------------------------------------------


def dmd_draws(t_min, t_max):
    r_t, r_n = jax.random.split(RNG)
    t = np.asarray(jax.random.uniform(r_t, (B,), minval=t_min, maxval=t_max), np.float64)
    return t, np.asarray(jax.random.normal(r_n, (B, 3)), np.float64)


def generator_start(rp, batch):
    """``sigma(1) * noise``, or the pairs' noise itself (it is the teacher's prior sample)."""
    noise = np.asarray(batch["noise"], np.float64)
    return noise if "x" in batch else rp.alpha_sigma(np.ones(1))[1] * noise


def generate(X_, p, rp, pred, z, t_start, label):
    """One student step ``G(z, t_start, 0) = alpha_0 x0 + sigma_0 eps``."""
    x0, eps = x0_eps_net(X_, p, rp, pred, z, t_start + 0.0 * z[:, 0], label, None)
    a0, s0 = rp.alpha_sigma(0.0 * z[:, 0], X_.xp)
    return col(a0, X_.xp) * x0 + col(s0, X_.xp) * eps


DMD_CASES = [
    ("rf", "flow", dict(guidance=2.0), True, False),
    ("ddpm", "v", dict(reg_weight=0.25, t_min=0.1, t_max=0.9), False, True),  # DMD v1's regression on pairs
]


@pytest.mark.parametrize("case", range(len(DMD_CASES)))
def test_dmd_generator_value_and_gradient(case):
    path_name, pred, opts, conditional, pairs = DMD_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    st, sp, fp = networks(path, pred, conditional, 0)
    teacher = eqs.teacher_for(path)
    batch = noise_batch(10 + case)
    if pairs:
        batch["x"] = jnp.asarray(eqs.MIX_MEANS[np.arange(B) % 3] + 0.3, jnp.float32)
    term = get_factory("dmd")(cfg(**opts), st)
    tf = eqs.teacher_float_params(teacher)

    def run(s_, f_, tfl):
        inp = eqs.inputs(eqs.with_teacher_params(teacher, tfl), st, others={"fake": f_}, nets=(("fake", st),))
        return term(s_, inp, batch, RNG)

    (loss, _), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(sp, fp, tf)

    label = np.asarray(batch["label"])
    z = generator_start(rp, batch)
    x = generate(NP, eqs.to_np(sp), rp, pred, z, 1.0, label)
    t, n = dmd_draws(opts.get("t_min", 0.02), opts.get("t_max", 0.98))
    x_t = eqs.interpolate(rp, x, n, t)
    x0_real = eqs.guided_x0_eps(rp, x_t, t, label, opts.get("guidance", 1.0))[0]
    x0_fake = x0_eps_net(NP, eqs.to_np(fp), rp, pred, x_t, t, label, None)[0]
    # DMD2: grad = (p_real - p_fake) / mean_D |p_real|, p = x - mu(x_t); L = 0.5 |x - sg(x - grad)|^2
    p_real, p_fake = x - x0_real, x - x0_fake
    grad = (p_real - p_fake) / col(np.mean(np.abs(p_real), 1) + 1e-6)
    reg_x = np.asarray(batch["x"], np.float64) if pairs else None
    lam = opts.get("reg_weight", 0.0)

    def ref(X_, p, grad, reg_x):
        xp = X_.xp
        xg = generate(X_, p, rp, pred, xp.asarray(z), 1.0, xp.asarray(label))
        out = 0.5 * xp.mean((xg - X_.sg(xg - grad)) ** 2)
        return out + lam * xp.mean((xg - reg_x) ** 2) if lam else out

    want = ref(NP, eqs.to_np(sp), grad, reg_x)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(grads[1], "fake score")
    eqs.assert_all_zero(grads[2], "teacher")
    f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)
    g_want = jax.jit(jax.grad(lambda p: ref(JX, p, f32(grad), f32(reg_x))))(sp)
    eqs.assert_tree_close(grads[0], g_want, rtol=2e-4, atol=1e-7, what="dmd generator")
    eqs.assert_groups_nonzero(grads[0], list(sp), "dmd generator")


@pytest.mark.parametrize("weighting", ["karras", "snr_clip", "none"])
def test_dmd_fake_value_and_gradient(weighting):
    path, rp = eqs.REF_PATHS["rf"]
    st, sp, fp = networks(path, "flow", True, 0)
    teacher = eqs.teacher_for(path)
    batch = noise_batch(20)
    opts = dict(weighting=weighting, sigma_data=0.7, snr_clip=2.0)
    term = get_factory("dmd_fake")(cfg(**opts), st)
    tf = eqs.teacher_float_params(teacher)

    def run(f_, s_, tfl):
        inp = eqs.inputs(
            eqs.with_teacher_params(teacher, tfl), st, others={"student": s_}, nets=(("fake", st),)
        )
        return term(f_, inp, batch, RNG)

    (loss, _), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(fp, sp, tf)
    label = np.asarray(batch["label"])
    x = generate(NP, eqs.to_np(sp), rp, "flow", generator_start(rp, batch), 1.0, label)
    t, n = dmd_draws(0.001, 0.999)
    x_t = eqs.interpolate(rp, x, n, t)
    a, s = rp.alpha_sigma(t)
    w = {"karras": (a / s) ** 2 + 1 / 0.7**2, "snr_clip": np.minimum((a / s) ** 2, 2.0), "none": np.ones(B)}[
        weighting
    ]

    def ref(X_, f, x_t, t, x, w):
        x0_f = x0_eps_net(X_, f, rp, "flow", x_t, t, X_.xp.asarray(label), None)[0]
        return X_.xp.mean(w * X_.xp.mean((x0_f - x) ** 2, axis=1))

    np.testing.assert_allclose(float(loss), ref(NP, eqs.to_np(fp), x_t, t, x, w), rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(grads[1], "generator")
    eqs.assert_all_zero(grads[2], "teacher")
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    g_want = jax.jit(jax.grad(lambda f: ref(JX, f, f32(x_t), f32(t), f32(x), f32(w))))(fp)
    eqs.assert_tree_close(grads[0], g_want, rtol=2e-4, atol=1e-7, what=f"dmd fake {weighting}")
    eqs.assert_groups_nonzero(grads[0], list(fp), "dmd fake")
