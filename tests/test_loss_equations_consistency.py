"""TCD and LCM loss terms and their shared DDIM jump pinned against the equations (docs/methods.md
§1.4, §3.1, §3.2, §5.3, pitfalls 4, 6 and 19).

Each term runs on a small fixed batch with the exact Gaussian-mixture teacher (tests/loss_reference.py)
and a tiny MLP student; the jump's draws (``idx``, ``end``, ``w``, the noise) are reproduced from the
term's key with ``jax.random``, everything else is numpy float64 from the equations: the DDIM solver's
integer grid ``t_i = k i - 1`` with ``abar_prev`` of the lowest point ``abar[0]``, one DDIM step of the
teacher guided in LCM's form ``x_c + w (x_c - x_u)`` (Imagen scale ``1 + w``), TCF(1) / TCF(2)
(DPM-Solver++(2S) through ``lambda_t + r h``) and LCM's boundary scalings on integer timesteps.
Gradients are compared with ``jax.grad`` of the same equations, the target under stop-gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewstep_jax.losses.api import get_factory
from fewstep_jax.losses.consistency import skip_times, tcf
from tests import loss_reference as eqs
from tests.loss_reference import JX, NP, col

B = 16
RNG = jax.random.PRNGKey(5)
T = 1000


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def solver_grid(rp, n):
    """``(t_start, t_prev)`` of the distillation scripts' DDIM solver as times, and their timesteps.

    DDPM: ``k = T // n``, timesteps ``k i - 1`` (i = 1..n), the step below ``k (i - 1) - 1`` and
    timestep 0 (``abar[0]``) below the lowest; other paths ``i / n`` and ``(i - 1) / n``.
    """
    if rp.name == "ddpm":
        k = T // n
        ts = k * np.arange(1, n + 1) - 1
        prev = np.concatenate([[0], ts[:-1]])
        return (ts + 1) / T, (prev + 1) / T, ts, prev
    i = np.arange(1, n + 1)
    return i / n, (i - 1) / n, i * T / n - 1, np.maximum((i - 1) * T / n - 1, 0)


def draws(o, batch):
    """The jump's draws from the term's key: idx ~ U{0..n-1}, end ~ U{0..idx}, w ~ U[w_min, w_max], eps."""
    x = batch["x"]
    k_idx, k_end, k_w, k_eps = jax.random.split(RNG, 4)
    n = o["num_ddim_timesteps"]
    idx = jax.random.randint(k_idx, (B,), 0, n)
    end = jax.random.randint(k_end, (B,), 0, idx + 1)
    w = jax.random.uniform(k_w, (B,), jnp.float32, o.get("w_min", 0.0), o.get("w_max", 0.0))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    return np.asarray(idx), np.asarray(end), np.asarray(w, np.float64), np.asarray(eps, np.float64)


def make_batch(seed=0):
    r = np.random.default_rng(seed)
    x = (eqs.MIX_MEANS[r.integers(0, 3, B)] + 0.4 * r.standard_normal((B, 3))).astype(np.float32)
    return {"x": jnp.asarray(x), "label": jnp.asarray(np.arange(B) % 3 - 1, jnp.int32)}  # -1, 0, 1


def constants(rp, o, batch):
    """Every quantity of the loss that does not depend on the student: times, x_hi, the teacher's jump."""
    x = np.asarray(batch["x"], np.float64)
    lab = np.asarray(batch["label"])
    idx, end, w, eps = draws(o, batch)
    t_start, t_prev, ts, prev = solver_grid(rp, o["num_ddim_timesteps"])
    t_hi, t_lo, t_m = t_start[idx], t_prev[idx], t_prev[end]
    x_hi = eqs.interpolate(rp, x, eps, t_hi)
    guided = o.get("w_max", 0.0) > 0
    x0, e = eqs.guided_x0_eps(rp, x_hi, t_hi, lab, 1.0 + w if guided else 1.0)  # LCM's w is Imagen's 1 + w
    x_lo = eqs.interpolate(rp, x0, e, t_lo)
    return {
        "x_hi": x_hi,
        "x_lo": x_lo,
        "t_hi": t_hi,
        "t_lo": t_lo,
        "t_m": t_m,
        "k_hi": ts[idx],
        "k_lo": prev[idx],
        "label": lab,
        "w": w if o.get("guidance_embed") else None,
        "idx": idx,
        "end": end,
    }


def as_jax(c):
    out = {}
    for key, v in c.items():
        if v is None or key in ("idx", "end"):
            out[key] = v
        elif key == "label":
            out[key] = jnp.asarray(v, jnp.int32)
        else:
            out[key] = jnp.asarray(v, jnp.float32)
    return out


def x0_eps_of(X_, p, rp, pred, x, t, c):
    out = eqs.net(X_, p, x, t, None, label=c["label"], guidance=c["w"])
    return eqs.to_x0_eps(rp, out, pred, x, t, X_.xp)


def tcf_ref(X_, p, rp, pred, x, t, s, u, order, r, c):
    """TCF(1) ``alpha_s x0 + sigma_s eps``; TCF(2), DPM-Solver++(2S) with the intermediate time ``u``
    (``lambda_u = lambda_t + r h``): ``x_u = alpha_u x0_t + sigma_u (x_t - alpha_t x0_t) / sigma_t``,
    ``D = (1 - 1/2r) x0_t + 1/2r x0(x_u, u)``, ``f = alpha_s D + sigma_s (x_t - alpha_t D) / sigma_t``."""
    xp = X_.xp
    a_s, s_s = (col(v, xp) for v in rp.alpha_sigma(s, xp))
    x0_t, eps_t = x0_eps_of(X_, p, rp, pred, x, t, c)
    if order == 1:
        return a_s * x0_t + s_s * eps_t
    a_t, s_t = (col(v, xp) for v in rp.alpha_sigma(t, xp))
    a_u, s_u = (col(v, xp) for v in rp.alpha_sigma(u, xp))
    at_data = col(t == 0, xp)  # t = s = 0: the formula is 0/0 there; f(x, t, t) = x
    s_t = xp.where(at_data, 1.0, s_t)
    x_u = a_u * x0_t + s_u * (x - a_t * x0_t) / s_t
    x0_u = x0_eps_of(X_, p, rp, pred, x_u, u, c)[0]
    d = (1 - 0.5 / r) * x0_t + (0.5 / r) * x0_u
    return xp.where(at_data, x, a_s * d + s_s * (x - a_t * d) / s_t)


def mid_time(rp, t, s, r):
    """``u`` with ``lambda_u = (1 - r) lambda_t + r lambda_s``, ``lambda = log(alpha / sigma)``; u = 0 when
    s = 0 (lambda_s = +inf), u = t from pure noise (lambda_t = -inf) unless r = 1 (lambda_u = lambda_s).
    From pure noise into the data both ends are infinite; u = t there (x_u = x_t; u = 0 gives the same f)."""
    if r == 1.0:
        return s
    with np.errstate(divide="ignore", invalid="ignore"):
        lam_u = (1 - r) * rp.logsnr_half(t) + r * rp.logsnr_half(s)
        return np.where(np.isnan(lam_u), t, rp.t_from_logsnr_half(lam_u))


def tcd_ref(X_, p, tp, rp, pred, order, r, c, u_hi, u_lo, distance, huber_c):
    xp = X_.xp
    pred_ = tcf_ref(X_, p, rp, pred, c["x_hi"], c["t_hi"], c["t_m"], u_hi, order, r, c)
    tgt = X_.sg(tcf_ref(X_, tp, rp, pred, c["x_lo"], c["t_lo"], c["t_m"], u_lo, order, r, c))
    return xp.mean(eqs.dist(pred_, tgt, distance, huber_c, xp))


TCD_CASES = [
    # path, prediction, options, order, tcf2_r
    ("ddpm", "eps", dict(w_min=1.0, w_max=3.0, guidance_embed=True), 1, 0.5),
    ("ddpm", "v", dict(num_ddim_timesteps=10, target="online", distance="huber", huber_c=0.02), 1, 0.5),
    ("vp_cosine", "v", dict(num_ddim_timesteps=10, w_min=0.5, w_max=2.0), 2, 0.5),
    (
        "rf",
        "flow",
        dict(num_ddim_timesteps=8, guidance_embed=True, w_min=0.0, w_max=1.5, target="online"),
        2,
        0.3,
    ),
]


def _student(path, pred, guidance):
    st = eqs.mlp_student(path, form="semilinear", prediction=pred, uses_s=False)
    return (
        st,
        eqs.mlp_init(3, num_classes=2, guidance=guidance),
        eqs.mlp_init(4, num_classes=2, guidance=guidance, scale=0.5),
    )


def _run(term, st, teacher, params, ema, batch):
    tf = eqs.teacher_float_params(teacher)

    def f(p, tfl, e):
        return term(p, eqs.inputs(eqs.with_teacher_params(teacher, tfl), st, e), batch, RNG)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(params, tf, ema)


@pytest.mark.parametrize("case", range(len(TCD_CASES)))
def test_tcd_value_and_gradient(case):
    path_name, pred, opts, order, r = TCD_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    o = {"num_ddim_timesteps": 50, "target": "ema", "distance": "l2", "huber_c": 1e-3, **opts}
    guided_embed = bool(o.get("guidance_embed"))
    st, params, ema = _student(path, pred, guided_embed)
    teacher = eqs.teacher_for(path)
    batch = make_batch(case)
    term = get_factory("tcd")(cfg(**opts, tcf_order=order, tcf2_r=r), st)
    loss, (g, g_teacher, g_ema) = _run(term, st, teacher, params, ema, batch)

    c = constants(rp, o, batch)
    # rows with t_m < t_lo pin the formula, not the s = t guard
    assert np.sum(c["end"] < c["idx"]) >= B // 3
    u_hi, u_lo = (
        (None, None)
        if order == 1
        else (mid_time(rp, c["t_hi"], c["t_m"], r), mid_time(rp, c["t_lo"], c["t_m"], r))
    )
    p64 = eqs.to_np(params)
    tp64 = p64 if o["target"] == "online" else eqs.to_np(ema)
    want = tcd_ref(NP, p64, tp64, rp, pred, order, r, c, u_hi, u_lo, o["distance"], o["huber_c"])
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(g_teacher, "teacher")
    eqs.assert_all_zero(g_ema, "EMA target")

    cj = as_jax(c)

    def ref(p):
        tp = jax.lax.stop_gradient(p) if o["target"] == "online" else ema
        f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)
        return tcd_ref(JX, p, tp, rp, pred, order, r, cj, f32(u_hi), f32(u_lo), o["distance"], o["huber_c"])

    eqs.assert_tree_close(g, jax.jit(jax.grad(ref))(params), rtol=2e-4, atol=1e-6, what="tcd")
    eqs.assert_groups_nonzero(g, list(params), "tcd")  # the guidance branch too, with guidance_embed


# ---------------------------------------------------------------------------------------------
# LCM (docs/methods.md §5.3): c_skip x + c_out x0 on integer timesteps, scaled by timestep_scaling
# ---------------------------------------------------------------------------------------------


def boundary(k, scaling):
    st = np.asarray(k, np.float64) * scaling
    return 0.25 / (st**2 + 0.25), st / np.sqrt(st**2 + 0.25)


def lcm_ref(X_, p, tp, rp, pred, c, scal, distance, huber_c):
    xp = X_.xp
    (cs_hi, co_hi), (cs_lo, co_lo) = scal
    pred_ = (
        col(cs_hi, xp) * c["x_hi"] + col(co_hi, xp) * x0_eps_of(X_, p, rp, pred, c["x_hi"], c["t_hi"], c)[0]
    )
    tgt = (
        col(cs_lo, xp) * c["x_lo"] + col(co_lo, xp) * x0_eps_of(X_, tp, rp, pred, c["x_lo"], c["t_lo"], c)[0]
    )
    return xp.mean(eqs.dist(pred_, X_.sg(tgt), distance, huber_c, xp))


LCM_CASES = [
    # a small timestep_scaling so that c_skip matters above timestep 0
    (
        "ddpm",
        "eps",
        dict(num_ddim_timesteps=10, w_min=1.0, w_max=3.0, guidance_embed=True, timestep_scaling=0.05),
    ),
    ("ddpm", "v", dict(target="online", distance="huber", huber_c=0.01)),
    ("vp_cosine", "x0", dict(num_ddim_timesteps=8, timestep_scaling=0.02, w_min=0.5, w_max=1.0)),
]


@pytest.mark.parametrize("case", range(len(LCM_CASES)))
def test_lcm_value_and_gradient(case):
    path_name, pred, opts = LCM_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    o = {
        "num_ddim_timesteps": 50,
        "target": "ema",
        "distance": "l2",
        "huber_c": 1e-3,
        "timestep_scaling": 10.0,
    }
    o.update(opts)
    st, params, ema = _student(path, pred, bool(o.get("guidance_embed")))
    teacher = eqs.teacher_for(path)
    batch = make_batch(10 + case)
    term = get_factory("lcm")(cfg(**opts), st)
    loss, (g, g_teacher, g_ema) = _run(term, st, teacher, params, ema, batch)

    c = constants(rp, o, batch)
    if rp.name == "ddpm" and o["num_ddim_timesteps"] <= 10:
        assert np.any(c["k_lo"] == 0)  # a target at timestep 0, where c_skip = 1 and c_out = 0
    scal = (boundary(c["k_hi"], o["timestep_scaling"]), boundary(c["k_lo"], o["timestep_scaling"]))
    p64 = eqs.to_np(params)
    tp64 = p64 if o["target"] == "online" else eqs.to_np(ema)
    want = lcm_ref(NP, p64, tp64, rp, pred, c, scal, o["distance"], o["huber_c"])
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(g_teacher, "teacher")
    eqs.assert_all_zero(g_ema, "EMA target")

    cj = as_jax(c)
    scal_j = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), scal)

    def ref(p):
        tp = jax.lax.stop_gradient(p) if o["target"] == "online" else ema
        return lcm_ref(JX, p, tp, rp, pred, cj, scal_j, o["distance"], o["huber_c"])

    eqs.assert_tree_close(g, jax.jit(jax.grad(ref))(params), rtol=2e-4, atol=1e-6, what="lcm")
    eqs.assert_groups_nonzero(g, list(params), "lcm")


# ---------------------------------------------------------------------------------------------
# the DDIM solver grid (docs/methods.md §3.2, pitfall 4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path_name, n", [("ddpm", 50), ("ddpm", 10), ("ddpm", 4), ("rf", 8), ("vp_cosine", 50)]
)
def test_skip_times_are_the_scripts_grid(path_name, n):
    path, rp = eqs.REF_PATHS[path_name]
    got_start, got_prev = skip_times(path, n)
    want_start, want_prev, ts, prev = solver_grid(rp, n)
    np.testing.assert_allclose(got_start, want_start, rtol=0, atol=1e-7)
    np.testing.assert_allclose(got_prev, want_prev, rtol=0, atol=1e-7)
    if path_name == "ddpm" and n == 50:
        assert ts[0] == 19 and ts[-1] == 999 and prev[0] == 0 and prev[1] == 19
        # the lowest jump lands on abar[0] = 1 - beta_0, not on abar = 1
        a, _ = path.alpha_sigma(jnp.asarray(got_prev[0]))
        np.testing.assert_allclose(float(a) ** 2, 1 - 0.00085, rtol=1e-6)


@pytest.mark.parametrize("path_name, pred", [("rf", "flow"), ("vp_cosine", "v")])
def test_tcf2_formula_away_from_s_equals_t_and_into_the_data(path_name, pred):
    """TCF(2) itself on fixed (t, s) pairs: s < t, s = 0 (h = inf: u = 0 exactly), s = t, for several r."""
    path, rp = eqs.REF_PATHS[path_name]
    st = eqs.mlp_student(path, form="semilinear", prediction=pred, uses_s=False)
    p = eqs.mlp_init(6)
    x = np.random.default_rng(1).standard_normal((7, 3))
    t = np.array([0.5, 0.875, 0.25, 0.5, 0.875, 0.6, 1.0])
    s = np.array([0.0, 0.0, 0.0, 0.25, 0.5, 0.6, 0.3])
    c = {"label": None, "w": None}
    for r in (0.5, 0.3, 0.1, 1.0):
        got = tcf(
            st, p, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), 2, r
        )
        want = tcf_ref(NP, eqs.to_np(p), rp, pred, x, t, s, mid_time(rp, t, s, r), 2, r, c)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6, err_msg=f"r={r}")
        np.testing.assert_array_equal(np.asarray(got)[5], np.asarray(x, np.float32)[5])  # s = t
