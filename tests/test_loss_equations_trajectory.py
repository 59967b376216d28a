"""Trajectory and flow-matching loss terms pinned against the equations (docs/methods.md §2.3, §5.1,
§5.2, §5.4, §5.6).

Each term runs on a small fixed batch with the exact Gaussian-mixture teacher and a tiny MLP
student (tests/loss_reference.py); its value is compared with a numpy float64 computation of the
method's equations, and its gradient with ``jax.grad`` of the same equations with the
stop-gradients the method names, one loss part at a time. The grid-time draw ``(n, k, m)`` of the
grid-based terms is chosen here and handed in by replacing the sampler the term calls (its
distribution is tested in tests/test_trajectory_losses.py); the other terms' draws are reproduced
from the term's key with ``jax.random``. Heun jumps end above t = 0 here (the last stage into the
data is a separate rule); Euler jumps also end at t = 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewstep_jax.losses.api import get_factory
from fewstep_jax.losses.trajectory import cd as cd_module
from fewstep_jax.losses.trajectory import traflow as traflow_module
from fewstep_jax.losses.trajectory.grid import GridTimes
from tests import loss_reference as eqs
from tests.loss_reference import JX, NP, col

B = 8
RNG = jax.random.PRNGKey(11)
# (n, k, m) per sample on a 6-interval grid, K = 4: s = t_m <= r = t_{n-k} < t = t_n; rows with
# s < r, s = r, s = 0 and t = 1; no jump ends at t = 0 (Heun) ...
DRAW_HEUN = (
    np.array([6, 6, 5, 4, 3, 2, 6, 5]),
    np.array([4, 1, 3, 2, 1, 1, 2, 2]),
    np.array([0, 5, 1, 2, 0, 0, 1, 3]),
)
# ... and jumps into the data for Euler (n = k)
DRAW_EULER = (
    np.array([4, 5, 5, 3, 2, 1, 5, 4]),
    np.array([4, 1, 3, 3, 1, 1, 2, 4]),
    np.array([0, 4, 1, 0, 1, 0, 2, 0]),
)


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def make_batch(rp, seed=0, labels=False, dim=3):
    """``{"x", "noise"}`` (+ labels): x near the mixture's scale, noise standard normal (the terms
    read ``eps = noise / sigma(1)``, and sigma(1) = 1 on every path used here)."""
    r = np.random.default_rng(seed)
    x = (eqs.MIX_MEANS[r.integers(0, 3, B)] + 0.5 * r.standard_normal((B, dim))).astype(np.float32)
    batch = {"x": jnp.asarray(x), "noise": jnp.asarray(r.standard_normal((B, dim)).astype(np.float32))}
    if labels:
        batch["label"] = jnp.asarray(np.array([0, 1, -1, 1, 0, 1, -1, 0]), jnp.int32)
    return batch


def np_batch(batch):
    lab = batch.get("label")
    return (
        np.asarray(batch["x"], np.float64),
        np.asarray(batch["noise"], np.float64),
        None if lab is None else np.asarray(lab),
    )


# ---------------------------------------------------------------------------------------------
# time grids from their definitions (docs/methods.md §2.3, §5.2)
# ---------------------------------------------------------------------------------------------


def ref_grid(kind, N, rp):
    """Ascending ``0 = t_0 < ... < t_N = 1``: uniform, or EDM's rho = 7 grid in sigma = sigma_t / alpha_t
    from 80 to 0.002 (N - 1 intervals, the first time set to 1) then a last interval to t = 0."""
    if kind == "uniform":
        return np.arange(N + 1) / N
    i = np.arange(N) / (N - 1)
    sig = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = sig / (1 + sig) if rp.name == "rf" else (2 / math.pi) * np.arctan(sig)  # invert sigma_t / alpha_t
    t[0] = 1.0
    return np.concatenate([t, [0.0]])[::-1]


def fixed_times(monkeypatch, module, draw):
    """Makes ``module``'s grid-time sampler return the rows ``draw = (n, k, m)`` on the term's grid."""
    n, k, m = (jnp.asarray(v, jnp.int32) for v in draw)

    def sample(rng, grid, batch, max_jump, *args, **kwargs):
        grid = jnp.asarray(grid, jnp.float32)
        return GridTimes(n, k, m, grid[n], grid[n - k], grid[m])

    monkeypatch.setattr(module, "sample_grid_times", sample)


def ref_solve(rp, x, times, method, label, scale):
    """Euler / Heun along the descending ``times`` per sample: (B, M + 1)."""
    v = lambda xx, tt: eqs.gmm_velocity(rp, xx, tt, label, scale)
    for j in range(times.shape[1] - 1):
        t, s = times[:, j], times[:, j + 1]
        h = col(s - t)
        v1 = v(x, t)
        x = x + h * v1 if method == "euler" else x + 0.5 * h * (v1 + v(x + h * v1, s))
    return x


def ref_jump(rp, x, grid, n, k, method, substeps, label, scale):
    """The teacher's solve t_n -> t_{n-k} over the k grid intervals, each in ``substeps`` equal steps
    (per sample; shorter jumps are padded with zero-length steps, which change nothing)."""
    K = int(k.max())
    rows = []
    for nb, kb in zip(n, k):
        ts = []
        for j in range(kb):
            hi, lo = grid[nb - j], grid[nb - j - 1]
            ts += [hi + (lo - hi) * q / substeps for q in range(substeps)]
        ts += [grid[nb - kb]] * ((K - kb) * substeps + 1)
        rows.append(ts)
    return ref_solve(rp, x, np.asarray(rows), method, label, scale)


# ---------------------------------------------------------------------------------------------
# the student: G(x, t, s) = x + (s - t) g(x, t, s), g the network's output (a velocity)
# ---------------------------------------------------------------------------------------------


def g_of(X_, p, x, t, s, label):
    return eqs.net(X_, p, x, t, s, label=label)


def jump_of(X_, p, x, t, s, label):
    return x + col(s - t, X_.xp) * g_of(X_, p, x, t, s, label)


def traflow_parts(X_, p, tp, c, opts, rp):
    """Every TraFlow part (docs/methods.md §2.3) from the precomputed constants ``c``; ``tp`` the target
    params (the EMA, or ``sg(p)`` for the online target)."""
    xp, sg = X_.xp, X_.sg
    d = lambda a, b: eqs.dist(a, b, opts.get("distance", "l2"), opts.get("huber_c", 0.0), xp)
    x_t, x_r, t, r, s, lab = c["x_t"], c["x_r"], c["t"], c["r"], c["s"], c["label"]
    zero = 0.0 * s
    out = {}
    out["rec"] = xp.mean(d(jump_of(X_, p, x_t, t, r, lab), x_r))
    if opts.get("vel_variant", "A") == "A":
        out["vel"] = xp.mean(eqs.dist(g_of(X_, p, x_t, t, s, lab), c["u"], xp=xp))
    else:
        out["vel"] = xp.mean(eqs.dist(g_of(X_, p, x_t, t, r, lab), (x_t - x_r) / col(t - r, xp), xp=xp))
    est = jump_of(X_, tp, jump_of(X_, p, x_t, t, s, lab), s, zero, lab)
    tgt = sg(jump_of(X_, tp, sg(jump_of(X_, p, x_r, r, s, lab)), s, zero, lab))
    out["con"] = xp.mean(d(est, tgt))
    out["straight"] = xp.mean(eqs.dist(g_of(X_, p, x_t, t, s, lab), g_of(X_, p, x_t, t, r, lab), xp=xp))
    x0_hat = eqs.to_x0_eps(rp, g_of(X_, p, x_t, t, t, lab), "flow", x_t, t, xp)[0]
    out["dsm"] = xp.mean(eqs.dist(x0_hat, c["x0"], xp=xp))
    return out


def traflow_constants(rp, batch, grid, draw, opts, as_jax=False):
    x0, eps, lab = np_batch(batch)
    n, k, m = draw
    t, r, s = grid[n], grid[n - k], grid[m]
    x_t = eqs.interpolate(rp, x0, eps, t)
    scale = opts.get("guidance", 1.0)
    method, sub = opts.get("solver", "heun"), opts.get("substeps", 1)
    c = {
        "x0": x0,
        "x_t": x_t,
        "t": t,
        "r": r,
        "s": s,
        "label": lab,
        "x_r": ref_jump(rp, x_t, grid, n, k, method, sub, lab, scale),
        "u": eqs.gmm_velocity(rp, x_t, t, lab, scale),
    }
    if as_jax:
        c = {key: (v if v is None or key == "label" else jnp.asarray(v, jnp.float32)) for key, v in c.items()}
        if lab is not None:
            c["label"] = jnp.asarray(lab, jnp.int32)
    return c


PARTS = ("rec", "vel", "con", "straight", "dsm")

TRAFLOW_CASES = [
    # (path, options, draw, target, conditional)
    ("rf", dict(num_grid=6, max_jump=4, substeps=2), DRAW_HEUN, "ema", False),
    ("rf", dict(num_grid=6, max_jump=4, vel_variant="B", distance="huber_vec"), DRAW_HEUN, "online", False),
    (
        "rf",
        dict(num_grid=6, max_jump=4, solver="euler", distance="huber", huber_c=0.05),
        DRAW_EULER,
        "ema",
        False,
    ),
    (
        "vp_cosine",
        dict(grid="edm", num_grid=6, max_jump=4, substeps=2, guidance=2.5),
        DRAW_HEUN,
        "ema",
        True,
    ),
]


def _student_and_params(path, conditional):
    st = eqs.mlp_student(path, form="euler", prediction="flow", uses_s=True)
    nc = 2 if conditional else 0
    return (
        st,
        eqs.mlp_init(1, uses_s=True, num_classes=nc),
        eqs.mlp_init(2, uses_s=True, num_classes=nc, scale=0.5),
    )


@pytest.mark.parametrize("case", range(len(TRAFLOW_CASES)))
def test_traflow_every_part_value_and_gradient(case, monkeypatch):
    path_name, opts, draw, target, conditional = TRAFLOW_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    fixed_times(monkeypatch, traflow_module, draw)
    st, params, ema = _student_and_params(path, conditional)
    teacher = eqs.teacher_for(path)
    batch = make_batch(rp, seed=case, labels=conditional)
    grid = ref_grid(opts.get("grid", "uniform"), opts["num_grid"], rp)
    lams = dict(lam_rec=1.0, lam_vel=0.7, lam_con=1.3, lam_straight=0.4, lam_dsm=0.6)
    term = get_factory("traflow")(cfg(**opts, **lams, target=target), st)
    tf = eqs.teacher_float_params(teacher)

    def run(p, tfl, e):
        return term(p, eqs.inputs(eqs.with_teacher_params(teacher, tfl), st, e), batch, RNG)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))(
        params, tf, ema
    )

    c = traflow_constants(rp, batch, grid, draw, opts)
    p64, e64 = eqs.to_np(params), eqs.to_np(ema)
    want = traflow_parts(NP, p64, e64 if target == "ema" else p64, c, opts, rp)
    for part in PARTS:
        np.testing.assert_allclose(
            float(metrics[f"traflow/{part}"]), want[part], rtol=2e-5, atol=1e-6, err_msg=part
        )
    total = sum(lams[f"lam_{p}"] * want[p] for p in PARTS)
    np.testing.assert_allclose(float(loss), total, rtol=2e-5, atol=1e-6)
    eqs.assert_all_zero(grads[1], "teacher")
    eqs.assert_all_zero(grads[2], "EMA target")

    # each part alone: its gradient is the equations' (stop-gradients as named), into every group
    cj = traflow_constants(rp, batch, grid, draw, opts, as_jax=True)
    inp = eqs.inputs(teacher, st, ema)

    single = {
        part: get_factory("traflow")(
            cfg(**opts, **{k: float(k == f"lam_{part}") for k in lams}, target=target), st
        )
        for part in PARTS
    }

    def part_grads(p):
        out = {}
        for part, term_p in single.items():

            def ref(q, part=part):
                tp = ema if target == "ema" else jax.lax.stop_gradient(q)
                return traflow_parts(JX, q, tp, cj, opts, rp)[part]

            out[part] = (jax.grad(lambda q, f=term_p: f(q, inp, batch, RNG)[0])(p), jax.grad(ref)(p))
        return out

    for part, (g_got, g_want) in jax.jit(part_grads)(params).items():
        eqs.assert_tree_close(g_got, g_want, rtol=2e-4, atol=2e-6, what=f"traflow {part}")
        # the output bias cancels in straightness's difference of two velocities
        trained = [g for g in params if not (part == "straight" and g == "out_b")]
        eqs.assert_groups_nonzero(g_got, trained, f"traflow {part}")


def test_single_part_terms_and_ctm_are_the_core_parts(monkeypatch):
    """traflow_rec / _vel / _con / straightness and ctm (con + dsm) against the same equations."""
    path, rp = eqs.REF_PATHS["rf"]
    fixed_times(monkeypatch, traflow_module, DRAW_HEUN)
    st, params, ema = _student_and_params(path, False)
    teacher = eqs.teacher_for(path)
    batch = make_batch(rp, seed=7)
    opts = dict(num_grid=6, max_jump=4, substeps=2, distance="huber")
    grid = ref_grid("uniform", 6, rp)
    c = traflow_constants(rp, batch, grid, DRAW_HEUN, opts)
    p64, e64 = eqs.to_np(params), eqs.to_np(ema)
    want = traflow_parts(NP, p64, e64, c, opts, rp)
    inp = eqs.inputs(teacher, st, ema)
    names = {"traflow_rec": "rec", "traflow_vel": "vel", "traflow_con": "con", "straightness": "straight"}
    terms = {name: get_factory(name)(cfg(**opts), st) for name in names}
    got = jax.jit(lambda p: {name: f(p, inp, batch, RNG)[0] for name, f in terms.items()})(params)
    for name, part in names.items():
        np.testing.assert_allclose(float(got[name]), want[part], rtol=2e-5, atol=1e-6, err_msg=name)

    # CTM: the soft consistency plus lam_dsm times the denoiser regression; gradient per part
    cj = traflow_constants(rp, batch, grid, DRAW_HEUN, opts, as_jax=True)
    for lam_dsm in (0.0, 0.5):
        term = get_factory("ctm")(cfg(**opts, lam_dsm=lam_dsm), st)
        (loss, m), g = jax.jit(jax.value_and_grad(lambda p, f=term: f(p, inp, batch, RNG), has_aux=True))(
            params
        )
        np.testing.assert_allclose(float(loss), want["con"] + lam_dsm * want["dsm"], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(float(m["ctm/con"]), want["con"], rtol=2e-5, atol=1e-6)

        def ref(p, lam_dsm=lam_dsm, cj=cj):
            parts = traflow_parts(JX, p, ema, cj, opts, rp)
            return parts["con"] + lam_dsm * parts["dsm"]

        eqs.assert_tree_close(
            g, jax.jit(jax.grad(ref))(params), rtol=2e-4, atol=2e-6, what=f"ctm lam_dsm={lam_dsm}"
        )
        eqs.assert_groups_nonzero(g, list(params), "ctm")


# ---------------------------------------------------------------------------------------------
# CD (docs/methods.md §5.2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, distance", [("online", "l2"), ("ema", "huber")])
def test_cd_value_and_gradient(target, distance, monkeypatch):
    path, rp = eqs.REF_PATHS["rf"]
    draw = (np.array([6, 5, 4, 3, 2, 6, 4, 2]), np.ones(B, int), np.zeros(B, int))
    fixed_times(monkeypatch, cd_module, draw)
    st, params, ema = _student_and_params(path, True)
    teacher = eqs.teacher_for(path)
    batch = make_batch(rp, seed=3, labels=True)
    opts = dict(num_grid=6, substeps=3, guidance=2.0, target=target, distance=distance)
    term = get_factory("cd")(cfg(**opts), st)
    tf = eqs.teacher_float_params(teacher)
    run = lambda p, tfl, e: term(p, eqs.inputs(eqs.with_teacher_params(teacher, tfl), st, e), batch, RNG)[0]
    loss, grads = jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2)))(params, tf, ema)

    grid = ref_grid("edm", 6, rp)  # CD's default grid
    x0, eps, lab = np_batch(batch)
    n = draw[0]
    t, r = grid[n], grid[n - 1]
    x_t = eqs.interpolate(rp, x0, eps, t)
    x_r = ref_jump(rp, x_t, grid, n, draw[1], "heun", 3, lab, 2.0)

    def ref(X_, p, tp, x_t, x_r, t, r, lab):
        zero = 0.0 * t
        est = jump_of(X_, p, x_t, t, zero, lab)
        tgt = X_.sg(jump_of(X_, tp, x_r, r, zero, lab))
        return X_.xp.mean(eqs.dist(est, tgt, distance, xp=X_.xp))

    p64 = eqs.to_np(params)
    want = ref(NP, p64, eqs.to_np(ema) if target == "ema" else p64, x_t, x_r, t, r, lab)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(grads[1], "teacher")
    eqs.assert_all_zero(grads[2], "EMA target")
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    g_want = jax.grad(
        lambda p: ref(
            JX,
            p,
            ema if target == "ema" else jax.lax.stop_gradient(p),
            f32(x_t),
            f32(x_r),
            f32(t),
            f32(r),
            jnp.asarray(lab),
        )
    )(params)
    eqs.assert_tree_close(grads[0], g_want, rtol=2e-4, atol=1e-6, what="cd")
    eqs.assert_groups_nonzero(grads[0], [g for g in params if g != "s"], "cd")  # s = 0: no s feature


# ---------------------------------------------------------------------------------------------
# reflow, reflow_distill (docs/methods.md §5.1): draws reproduced from the term's key
# ---------------------------------------------------------------------------------------------


def test_reflow_and_reflow_distill_value_and_gradient():
    path, rp = eqs.REF_PATHS["vp_cosine"]
    st, params, _ = _student_and_params(path, False)
    batch = make_batch(rp, seed=4)
    x, noise, _ = np_batch(batch)
    _, k_time, _ = jax.random.split(RNG, 3)

    # reflow: |g(x_t, t, t) - (alpha' x + sigma' noise)|^2, t ~ U[0, 1 - t_eps]
    t = np.asarray(jax.random.uniform(k_time, (B,), maxval=1.0 - 0.05), np.float64)
    x_t = eqs.interpolate(rp, x, noise, t)
    target = eqs.velocity_of(rp, x, noise, t)

    def ref_reflow(X_, p, x_t, t, target):
        return X_.xp.mean(eqs.dist(g_of(X_, p, x_t, t, t, None), target, xp=X_.xp))

    term = get_factory("reflow")(cfg(t_eps=0.05), st)
    loss, g = jax.jit(jax.value_and_grad(lambda p: term(p, eqs.inputs(None, st), batch, RNG)[0]))(params)
    np.testing.assert_allclose(float(loss), ref_reflow(NP, eqs.to_np(params), x_t, t, target), rtol=2e-5)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    eqs.assert_tree_close(
        g, jax.grad(lambda p: ref_reflow(JX, p, f32(x_t), f32(t), f32(target)))(params), what="reflow"
    )
    eqs.assert_groups_nonzero(g, list(params), "reflow")

    # reflow_distill: d(G(x_t, t, 0), x), t = j / K, j ~ U{1..K}
    K = 3
    j = np.asarray(jax.random.randint(k_time, (B,), 1, K + 1))
    t = j / K
    x_t = eqs.interpolate(rp, x, noise, t)

    def ref_distill(X_, p, x_t, t, x):
        return X_.xp.mean(eqs.dist(jump_of(X_, p, x_t, t, 0.0 * t, None), x, "huber", 0.1, X_.xp))

    term = get_factory("reflow_distill")(cfg(num_steps=K, distance="huber", huber_c=0.1), st)
    loss, g = jax.jit(jax.value_and_grad(lambda p: term(p, eqs.inputs(None, st), batch, RNG)[0]))(params)
    np.testing.assert_allclose(float(loss), ref_distill(NP, eqs.to_np(params), x_t, t, x), rtol=2e-5)
    g_want = jax.grad(lambda p: ref_distill(JX, p, f32(x_t), f32(t), f32(x)))(params)
    eqs.assert_tree_close(g, g_want, what="reflow_distill")
    eqs.assert_groups_nonzero(g, [k for k in params if k != "s"], "reflow_distill")  # s = 0


# ---------------------------------------------------------------------------------------------
# shortcut (docs/methods.md §5.6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["ema", "online"])
def test_shortcut_value_and_gradient(target):
    path, rp = eqs.REF_PATHS["rf"]
    st, params, ema = _student_and_params(path, False)
    batch = make_batch(rp, seed=5)
    x, noise, _ = np_batch(batch)
    M, every, clip = 8, 2, 1.0  # a small clip, so the clipping is exercised
    nb = B // every
    _, k_lvl, k_j, k_fm, _ = jax.random.split(RNG, 5)
    lvl = np.asarray(jax.random.randint(k_lvl, (B,), 0, int(math.log2(M))))
    d_b = 2.0 ** (-lvl)
    j_b = np.floor(np.asarray(jax.random.uniform(k_j, (B,)), np.float64) * 2.0**lvl) + 1
    t_fm = np.asarray(jax.random.randint(k_fm, (B,), 1, M + 1)) / M
    boot = np.arange(B) < nb
    d = np.where(boot, d_b, 1.0 / M)
    t = np.where(boot, np.minimum(j_b * d_b, 1.0), t_fm)
    x_t = eqs.interpolate(rp, x, noise, t)
    v_fm = eqs.velocity_of(rp, x, noise, t)

    def ref(X_, p, tp, x_t, t, d, v_fm):
        xp = X_.xp
        cl = lambda v: xp.clip(v, -clip, clip)
        # bootstrap rows: two half jumps t -> t - d/2 -> t - d of the target network, clipped
        v1 = g_of(X_, tp, x_t[:nb], t[:nb], t[:nb] - d[:nb] / 2, None)
        x_mid = cl(x_t[:nb] - col(d[:nb] / 2, xp) * v1)
        v2 = g_of(X_, tp, x_mid, t[:nb] - d[:nb] / 2, t[:nb] - d[:nb], None)
        target = X_.sg(xp.concatenate([cl(0.5 * (v1 + v2)), v_fm[nb:]], axis=0))
        return xp.mean(eqs.dist(g_of(X_, p, x_t, t, t - d, None), target, xp=xp))

    term = get_factory("shortcut")(
        cfg(denoise_timesteps=M, bootstrap_every=every, clip=clip, bootstrap_target=target), st
    )
    run = lambda p, e: term(p, eqs.inputs(None, st, e), batch, RNG)[0]
    loss, (g, g_e) = jax.jit(jax.value_and_grad(run, argnums=(0, 1)))(params, ema)
    p64 = eqs.to_np(params)
    want = ref(NP, p64, eqs.to_np(ema) if target == "ema" else p64, x_t, t, d, v_fm)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    eqs.assert_all_zero(g_e, "EMA target")
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    g_want = jax.grad(
        lambda p: ref(
            JX, p, ema if target == "ema" else jax.lax.stop_gradient(p), f32(x_t), f32(t), f32(d), f32(v_fm)
        )
    )(params)
    eqs.assert_tree_close(g, g_want, what="shortcut")
    eqs.assert_groups_nonzero(g, list(params), "shortcut")


# ---------------------------------------------------------------------------------------------
# teacher objectives: flow matching and diffusion (losses/flow_matching.py)
# ---------------------------------------------------------------------------------------------

FM_CASES = [
    ("flow_matching", "rf", "flow", dict(t_min=0.01)),
    (
        "flow_matching",
        "vp_cosine",
        "flow",
        dict(t_sampling="logit_normal", logit_mean=0.3, logit_std=0.8, label_dropout=0.5),
    ),
    ("diffusion", "ddpm", "eps", dict(t_sampling="discrete", label_dropout=0.5)),
    ("diffusion", "ddpm", "v", dict(t_min=0.05)),
    ("diffusion", "vp_cosine", "x0", dict(t_min=0.05)),
]


@pytest.mark.parametrize("case", range(len(FM_CASES)))
def test_teacher_objectives_value_and_gradient(case):
    name, path_name, pred, opts = FM_CASES[case]
    path, rp = eqs.REF_PATHS[path_name]
    st = eqs.mlp_student(path, prediction=pred, uses_s=False)
    params = eqs.mlp_init(3, num_classes=2)
    batch = make_batch(rp, seed=6, labels=True)
    batch["label"] = jnp.abs(batch["label"])  # real labels; dropout makes the nulls
    x, _, lab = np_batch(batch)
    k_t, k = jax.random.split(RNG)
    k_eps, k_lab, _ = jax.random.split(k, 3)
    mode = opts.get("t_sampling", "uniform")
    if mode == "uniform":
        t = jax.random.uniform(k_t, (B,), jnp.float32, opts["t_min"], 1.0)
    elif mode == "logit_normal":
        t = jnp.clip(
            jax.nn.sigmoid(opts["logit_mean"] + opts["logit_std"] * jax.random.normal(k_t, (B,))), 1e-3, 1.0
        )
    else:  # integer timestep k at t = (k + 1) / T
        t = (jax.random.randint(k_t, (B,), 0, 1000) + 1.0) / 1000.0
    t = np.asarray(t, np.float64)
    eps = np.asarray(jax.random.normal(k_eps, (B, 3)), np.float64)
    p_drop = opts.get("label_dropout", 0.0)
    if p_drop:
        lab = np.where(np.asarray(jax.random.bernoulli(k_lab, p_drop, (B,))), -1, lab)
        assert 0 < np.sum(lab < 0) < B
    x_t = eqs.interpolate(rp, x, eps, t)
    a, s = (col(v) for v in rp.alpha_sigma(t))
    target = {"eps": eps, "x0": x, "v": a * eps - s * x}.get(pred)
    if pred == "flow":
        target = eqs.velocity_of(rp, x, eps, t)

    def ref(X_, p, x_t, t, target, lab):
        return X_.xp.mean(eqs.dist(eqs.net(X_, p, x_t, t, None, label=lab), target, xp=X_.xp))

    term = get_factory(name)(cfg(**opts), st)
    loss, g = jax.jit(jax.value_and_grad(lambda p: term(p, eqs.inputs(None, st), batch, RNG)[0]))(params)
    np.testing.assert_allclose(float(loss), ref(NP, eqs.to_np(params), x_t, t, target, lab), rtol=2e-5)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    g_want = jax.grad(lambda p: ref(JX, p, f32(x_t), f32(t), f32(target), jnp.asarray(lab)))(params)
    eqs.assert_tree_close(g, g_want, what=name)
    eqs.assert_groups_nonzero(g, list(params), name)
