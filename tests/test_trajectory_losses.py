"""Mathematics of the trajectory losses (TraFlow, CTM, CD, reflow, shortcut, mean-flow).

The analytic teacher is a 2-D Gaussian N(mu, diag(c^2)) on the rectified-flow path, whose flow map
is affine and known in closed form: x_t ~ N(m_t, sig_t^2) per dimension with m_t = (1 - t) mu,
sig_t^2 = (1 - t)^2 c^2 + t^2, and the (monotone, per-dimension) ODE map between two Gaussians is
Phi(x, t, s) = m_s + (sig_s / sig_t)(x - m_t).
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fewstep_jax import solvers
from fewstep_jax.losses import trajectory as tr
from fewstep_jax.losses.api import LossInputs, get_factory
from fewstep_jax.models import build_model, mlp_config
from fewstep_jax.paths import RectifiedFlow, bcast
from fewstep_jax.students import Student, model_apply
from fewstep_jax.teachers import pairs as teacher_pairs
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params

PATH = RectifiedFlow()
MU = np.array([1.0, -0.5], np.float32)
C = np.array([0.5, 0.3], np.float32)


def gaussian_teacher():
    return gaussian_mixture_teacher(gmm_params(MU[None], np.diag(C**2)[None], [1.0]), PATH, conditional=False)


def _m_sig(t):
    t = t[:, None]
    return (1 - t) * MU, jnp.sqrt((1 - t) ** 2 * C**2 + t**2)


def exact_phi(x, t, s):
    m_t, sig_t = _m_sig(t)
    m_s, sig_s = _m_sig(s)
    return m_s + sig_s / sig_t * (x - m_t)


def exact_velocity(x, t):
    m_t, sig_t = _m_sig(t)
    tt = t[:, None]
    return -MU + (tt - (1 - tt) * C**2) / sig_t**2 * (x - m_t)


def _exact_apply(params, x, t, s, label, guidance, num_steps, rngs, train):
    t = jnp.broadcast_to(t, (x.shape[0],))
    s = jnp.broadcast_to(t if s is None else s, (x.shape[0],))
    h = t - s
    safe = jnp.where(h > 1e-6, h, 1.0)
    avg = (x - exact_phi(x, t, s)) / safe[:, None]
    return params["a"] * jnp.where((h > 1e-6)[:, None], avg, exact_velocity(x, t))


EXACT = Student(apply=_exact_apply, path=PATH, form="euler", prediction="flow", uses_s=True)
EXACT_PARAMS = {"a": jnp.ones(())}


def _inputs(teacher, ema_params, student=EXACT):
    return LossInputs(
        teacher=teacher, student=student, ema={"target": ema_params}, others={}, step=jnp.zeros((), jnp.int32)
    )


def _batch(n=256, seed=0, pairs=False):
    rng = np.random.default_rng(seed)
    x = (MU + C * rng.standard_normal((n, 2))).astype(np.float32)
    batch = {"x": jnp.asarray(x)}
    if pairs:
        batch["noise"] = jnp.asarray(rng.standard_normal((n, 2)).astype(np.float32))
    return batch


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


# ---------------------------------------------------------------------------------------------
# time sampling and teacher jumps
# ---------------------------------------------------------------------------------------------


def test_grid_times_order_and_weighting():
    grid = tr.time_grid("uniform", 6, PATH)
    np.testing.assert_allclose(grid, np.linspace(0, 1, 7), atol=1e-6)
    edm = tr.time_grid("edm", 18, PATH)
    assert edm[0] == 0.0 and edm[-1] == 1.0 and np.all(np.diff(edm) > 0)

    # the start-first variant (CTM's own sampler: tests/test_fidelity_deviations.py)
    sample = jax.jit(tr.sample_grid_times, static_argnums=(2, 3, 4, 5))
    ts = sample(jax.random.PRNGKey(0), grid, 200_000, 4, "linear", "start_first")
    n, k, m = (np.asarray(v) for v in (ts.n, ts.k, ts.m))
    t, r, s = (np.asarray(v) for v in (ts.t, ts.r, ts.s))
    assert np.all(s <= r) and np.all(r < t)
    np.testing.assert_array_equal(t, grid[n])
    np.testing.assert_array_equal(r, grid[n - k])
    np.testing.assert_array_equal(s, grid[m])
    assert n.min() == 1 and n.max() == 6 and np.all(k <= np.minimum(n, 4)) and k.min() == 1
    np.testing.assert_allclose(np.bincount(n, minlength=7)[1:] / len(n), 1 / 6, atol=0.01)
    # p(k | n) ∝ k on {1..min(n, K)}
    for nn_, want in ((6, np.arange(1, 5) / 10), (2, np.array([1, 2]) / 3)):
        sel = k[n == nn_]
        np.testing.assert_allclose(np.bincount(sel, minlength=len(want) + 1)[1:] / len(sel), want, atol=0.015)
    # m ~ U{0..n-k}
    sel = m[(n - k) == 3]
    np.testing.assert_allclose(np.bincount(sel, minlength=4) / len(sel), 0.25, atol=0.015)

    ts_u = tr.sample_grid_times(jax.random.PRNGKey(1), grid, 100_000, 4, "uniform", "start_first")
    sel = np.asarray(ts_u.k)[np.asarray(ts_u.n) == 6]
    np.testing.assert_allclose(np.bincount(sel, minlength=5)[1:] / len(sel), 0.25, atol=0.015)


def test_teacher_jump_matches_grid_solve(method="heun", substeps=2):
    teacher = gaussian_teacher()
    grid = tr.time_grid("edm", 8, PATH)
    ts = tr.sample_grid_times(jax.random.PRNGKey(3), grid, 6, 5, "linear", "start_first")  # k per sample
    x_t = PATH.interpolate(_batch(6)["x"], jax.random.normal(jax.random.PRNGKey(4), (6, 2)), ts.t)
    got = np.asarray(tr.teacher_jump(teacher, x_t, grid, ts.n, ts.k, 5, method, substeps))
    assert len(set(np.asarray(ts.k).tolist())) > 1  # jumps of different lengths in one batch
    for i in range(6):
        n, k = int(ts.n[i]), int(ts.k[i])
        sub = grid[n - k : n + 1][::-1]
        pieces = [np.linspace(a, b, substeps + 1)[:-1] for a, b in itertools.pairwise(sub)]
        fine = np.concatenate([*pieces, sub[-1:]])
        want = solvers.solve(teacher.velocity_fn(), x_t[i : i + 1], fine, method)
        np.testing.assert_allclose(got[i], np.asarray(want)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# stop-gradients
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    ("traflow", dict(lam_straight=1.0, lam_dsm=1.0, num_grid=6, max_jump=3, solver="euler")),
    ("traflow", dict(vel_variant="B", num_grid=6, max_jump=4, distance="huber_vec")),
    ("ctm", dict(num_grid=6, max_jump=4, lam_dsm=1.0, distance="huber")),
    ("cd", dict(num_grid=6, target="ema")),
    ("cd", dict(num_grid=6)),
    ("reflow", {}),
    ("reflow_distill", dict(num_steps=2)),
    ("shortcut", dict(denoise_timesteps=8, bootstrap_every=2)),
    ("meanflow", dict(equal_fraction=0.25)),
]


def _mlp_student(seed=0):
    cfg = mlp_config()
    cfg.update(width=16, num_layers=1, emb_dim=16, use_s=True)
    model = build_model(cfg)
    x = jnp.zeros((2, 2))
    params = model.init(jax.random.PRNGKey(seed), x, jnp.ones(2), s=jnp.zeros(2))["params"]
    # generic params: the zero-initialised output layer would hide some dependencies
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    student = Student(apply=model_apply(model), path=PATH, uses_s=True)
    return student, jax.tree_util.tree_unflatten(tree, leaves)


def _float_leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree) if np.asarray(v).dtype.kind == "f"]


@pytest.mark.parametrize("name, cfg", GRAD_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRAD_CASES)])
def test_gradient_reaches_only_the_student(name, cfg):
    student, params = _mlp_student()
    _, ema = _mlp_student(seed=7)
    teacher = gaussian_teacher()
    term = get_factory(name)(_cfg(**cfg), student)
    batch = _batch(32, pairs=name.startswith("reflow"))

    def f(sp, tp, ep):
        return term(sp, _inputs(teacher.replace(params=tp), ep, student), batch, jax.random.PRNGKey(5))[0]

    g_s, g_t, g_e = jax.jit(jax.grad(f, argnums=(0, 1, 2), allow_int=True))(params, teacher.params, ema)
    assert np.isfinite(float(f(params, teacher.params, ema)))
    assert all(np.all(v == 0) for v in _float_leaves(g_t)), "teacher params received gradient"
    assert all(np.all(v == 0) for v in _float_leaves(g_e)), "EMA target params received gradient"
    assert any(np.any(v != 0) for v in _float_leaves(g_s)), "student params received no gradient"


def test_cd_target_is_online_params_under_stop_gradient():
    student, params = _mlp_student()
    _, other = _mlp_student(seed=7)
    teacher, batch, rng = gaussian_teacher(), _batch(32), jax.random.PRNGKey(2)
    online = get_factory("cd")(_cfg(num_grid=6), student)
    frozen = get_factory("cd")(_cfg(num_grid=6, target="ema"), student)
    # online target: the EMA slot is ignored; equal to an EMA target that holds a frozen copy of params
    loss_o = lambda p: online(p, _inputs(teacher, other, student), batch, rng)[0]
    loss_f = lambda p: frozen(p, _inputs(teacher, params, student), batch, rng)[0]
    val_o, g_o = jax.value_and_grad(loss_o)(params)
    val_f, g_f = jax.value_and_grad(loss_f)(params)
    np.testing.assert_allclose(float(val_o), float(val_f), rtol=1e-6)
    for a, b in zip(_float_leaves(g_o), _float_leaves(g_f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    val_other = frozen(params, _inputs(teacher, other, student), batch, rng)[0]
    assert abs(float(val_other) - float(val_f)) > 1e-6  # the target params do matter


# ---------------------------------------------------------------------------------------------
# exact flow maps are zero-loss
# ---------------------------------------------------------------------------------------------


def test_exact_average_velocity_student_is_the_flow_map():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
    t, s = jnp.full((8,), 0.9), jnp.full((8,), 0.2)
    fine = solvers.solve(gaussian_teacher().velocity_fn(), x, np.linspace(0.9, 0.2, 201), "rk4")
    np.testing.assert_allclose(np.asarray(EXACT(EXACT_PARAMS, x, t, s)), np.asarray(fine), atol=1e-5)
    np.testing.assert_allclose(np.asarray(exact_phi(x, t, s)), np.asarray(fine), atol=1e-5)


ZERO_CASES = [
    ("traflow_rec", dict(num_grid=8, max_jump=8, substeps=16)),
    ("traflow_rec", dict(grid="edm", num_grid=8, max_jump=8, substeps=16, distance="huber_vec")),
    ("traflow_vel", dict(vel_variant="B", num_grid=8, max_jump=8, substeps=16)),
    ("traflow_con", dict(num_grid=8, max_jump=8, substeps=16)),
    ("cd", dict(num_grid=8, substeps=16)),
    ("shortcut", dict(denoise_timesteps=16, bootstrap_every=1)),
    ("meanflow", dict(equal_fraction=0.25)),
]


@pytest.mark.parametrize("name, cfg", ZERO_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ZERO_CASES)])
def test_exact_flow_map_is_zero_loss(name, cfg):
    teacher = gaussian_teacher()
    term = jax.jit(get_factory(name)(_cfg(**cfg), EXACT))
    loss, _ = term(EXACT_PARAMS, _inputs(teacher, EXACT_PARAMS), _batch(256), jax.random.PRNGKey(0))
    # the same loss for a slightly wrong student (a = 0.9 scales the exact velocity) is large
    off, _ = term({"a": jnp.asarray(0.9)}, _inputs(teacher, EXACT_PARAMS), _batch(256), jax.random.PRNGKey(0))
    tol = 1e-4 if name == "traflow_rec" and cfg.get("distance") == "huber_vec" else 1e-8
    assert float(loss) < tol, float(loss)
    assert float(off) > 100 * float(loss) and float(off) > 1e-5


def test_reflow_distill_zero_on_exact_pairs_and_reflow_target():
    teacher = gaussian_teacher()
    noise = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    batch = {"noise": noise, "x": exact_phi(noise, jnp.ones(64), jnp.zeros(64))}
    term = get_factory("reflow_distill")(_cfg(), EXACT)
    assert float(term(EXACT_PARAMS, _inputs(teacher, EXACT_PARAMS), batch, jax.random.PRNGKey(1))[0]) < 1e-10
    # reflow regresses the straight-line velocity noise - x of the pair
    lin = Student(apply=lambda p, x, t, s, *a: p["v"], path=PATH, uses_s=True)
    v = batch["noise"] - batch["x"]
    fm = get_factory("reflow")(_cfg(), lin)
    loss = fm({"v": v}, _inputs(teacher, None), batch, jax.random.PRNGKey(1))[0]
    assert float(loss) < 1e-12
    with pytest.raises(ValueError, match="noise"):
        fm({"v": v}, _inputs(teacher, None), {"x": batch["x"]}, jax.random.PRNGKey(1))


def test_meanflow_target_closed_form():
    # g(x, t, s) = x * (t + s): d_t g = x, d_x g = (t + s) I, so target = v - (t - s)((t + s) v + x)
    lin = Student(apply=lambda p, x, t, s, *a: x * (t + s)[:, None], path=PATH, uses_s=True)
    x, v = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 2))
    t, s = jnp.linspace(0.2, 1.0, 5), jnp.linspace(0.0, 0.5, 5)
    got = tr.meanflow_target(lin, {}, x, t, s, v)
    d = bcast(t - s, x)
    want = v - d * (bcast(t + s, x) * v + x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_config_and_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="lam_typo"):
        get_factory("traflow")(_cfg(lam_typo=1.0), EXACT)
    with pytest.raises(ValueError, match="distance"):
        get_factory("cd")(_cfg(distance="lpips"), EXACT)
    term = get_factory("traflow_con")(_cfg(num_grid=4, max_jump=2), EXACT)
    no_ema = _inputs(gaussian_teacher(), None).replace(ema={})
    with pytest.raises(ValueError, match="target"):
        term(EXACT_PARAMS, no_ema, _batch(8), jax.random.PRNGKey(0))
    assert get_factory("traflow")(_cfg(weight=2.0), EXACT) is not None  # weight belongs to the train step


# ---------------------------------------------------------------------------------------------
# TraFlow training converges to the closed-form flow map
# ---------------------------------------------------------------------------------------------


class AffineMap(nn.Module):
    """g(x, t, s) = a(t, s) * x + b(t, s): the exact family of the Gaussian teacher's average velocity."""

    @nn.compact
    def __call__(self, x, t, s):
        t = jnp.broadcast_to(t, (x.shape[0],))
        s = jnp.broadcast_to(s, (x.shape[0],))
        h = jnp.stack([t, s, t * s, t * t, s * s], axis=-1)
        h = nn.tanh(nn.Dense(32)(h))
        a, b = jnp.split(nn.Dense(2 * x.shape[1])(h), 2, axis=-1)
        return a * x + b


def test_traflow_converges_to_the_gaussian_flow_map():
    model = AffineMap()
    student = Student(
        apply=lambda p, x, t, s, *a: model.apply({"params": p}, x, t, s), path=PATH, uses_s=True
    )
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 2)), jnp.ones(2), jnp.zeros(2))["params"]
    teacher = gaussian_teacher()
    term = get_factory("traflow")(
        _cfg(vel_variant="B", num_grid=8, max_jump=8, substeps=2, distance="l2"), student
    )
    opt = optax.adam(optax.cosine_decay_schedule(1e-2, 600, alpha=0.05))

    @jax.jit
    def step(state, key):
        p, ema, o = state
        kx, kl = jax.random.split(key)
        batch = {"x": MU + C * jax.random.normal(kx, (256, 2))}
        loss, g = jax.value_and_grad(lambda q: term(q, _inputs(teacher, ema, student), batch, kl)[0])(p)
        upd, o = opt.update(g, o, p)
        p = optax.apply_updates(p, upd)
        ema = jax.tree_util.tree_map(lambda e, q: 0.9 * e + 0.1 * q, ema, p)
        return (p, ema, o), loss

    state = (params, params, opt.init(params))
    keys = jax.random.split(jax.random.PRNGKey(1), 600)
    for key in keys:
        state, _ = step(state, key)
    p = state[0]

    x1 = jax.random.normal(jax.random.PRNGKey(9), (2000, 2))
    ones, zeros = jnp.ones(2000), jnp.zeros(2000)
    want = exact_phi(x1, ones, zeros)
    err = float(jnp.sqrt(jnp.mean((student(p, x1, ones, zeros) - want) ** 2)))
    euler = x1 - teacher.velocity(x1, ones)
    err_euler = float(jnp.sqrt(jnp.mean((euler - want) ** 2)))
    assert err < 0.03, (err, err_euler)
    assert err < 0.1 * err_euler
    # two student steps on the grid agree with the flow map too
    half = jnp.full((2000,), 0.5)
    two = student(p, student(p, x1, ones, half), half, zeros)
    assert float(jnp.sqrt(jnp.mean((two - want) ** 2))) < 0.03


# ---------------------------------------------------------------------------------------------
# reflow pairs
# ---------------------------------------------------------------------------------------------


def test_pairs_generate_save_load_source(tmp_path):
    teacher = gaussian_teacher()
    pairs = teacher_pairs.generate_pairs(
        teacher, jax.random.PRNGKey(0), 50, batch_size=16, method="heun", num_steps=64
    )
    assert pairs["noise"].shape == pairs["x"].shape == (50, 2)
    want = exact_phi(jnp.asarray(pairs["noise"]), jnp.ones(50), jnp.zeros(50))
    np.testing.assert_allclose(pairs["x"], np.asarray(want), atol=1e-3)
    assert len(np.unique(pairs["noise"][:, 0])) == 50  # batches draw different noise
    f = tmp_path / "sub" / "pairs.npz"
    teacher_pairs.save_pairs(f, pairs)
    loaded = teacher_pairs.load_pairs(f)
    np.testing.assert_array_equal(loaded["x"], pairs["x"])
    src = teacher_pairs.pair_source(f, global_batch_size=10, seed=0)
    b = src.batch(3)
    assert set(b) == {"noise", "x"} and b["x"].shape == (10, 2)
    np.testing.assert_allclose(
        b["x"], np.asarray(exact_phi(jnp.asarray(b["noise"]), jnp.ones(10), jnp.zeros(10))), atol=1e-3
    )
    with pytest.raises(FileNotFoundError):
        teacher_pairs.load_pairs(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="noise"):
        teacher_pairs.pair_source({"x": pairs["x"]}, 10, 0)
