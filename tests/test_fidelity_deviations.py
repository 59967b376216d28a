"""The four deviations from the reference methods fixed by issue 16, each pinned against numpy
written from the method's equations (docs/methods.md pitfall 23, §5.4, §5.5, §5.7).

1. A teacher singular at the data steps into t = 0 with Euler in the trajectory losses' jumps and
   the reflow pairs, as the evaluation's solvers do (one rule, ``solvers.into_data_is_euler``).
2. CTM's jump sampler: ``k ~ p(k) ∝ k`` once per batch, then the start uniformly among those that fit.
3. DMD / DMD2: the generator updates first and the fake score trains on the pre-update samples;
   noise levels uniform over the indices of DMD2's 1000-point Karras grid.
4. MeanFlow's adaptive weight from the per-sample error summed over dimensions.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewstep_jax import solvers
from fewstep_jax.losses.api import LossInputs, get_factory, register
from fewstep_jax.losses.trajectory import cd as cd_module
from fewstep_jax.losses.trajectory import traflow as traflow_module
from fewstep_jax.losses.trajectory.grid import GridTimes, teacher_jump
from fewstep_jax.paths import get_path
from fewstep_jax.recipes import base
from fewstep_jax.students import Student
from fewstep_jax.teachers import pairs as teacher_pairs
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params, ideal_denoiser_teacher
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import make_step_fn

# ---------------------------------------------------------------------------------------------
# 1. the last stage into the data
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(16)
DATA = RNG.standard_normal((6, 3)).astype(np.float32)  # a finite set: the ideal denoiser's data


def np_ideal_velocity(x, t):
    """The rectified-flow velocity of the empirical distribution of DATA, from its definition:
    ``x0 = E[x0 | x_t]`` (softmax of ``-|x - (1-t) x_i|^2 / 2 t^2``), ``eps = (x - (1-t) x0) / t``,
    ``u = -x0 + eps``; x (B, D), t (B,) > 0."""
    d = DATA.astype(np.float64)
    a, s = (1.0 - t)[:, None], t[:, None]
    logits = -((x[:, None, :] - a[:, :, None] * d[None]) ** 2).sum(-1) / (2 * s**2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    x0 = (p / p.sum(1, keepdims=True)) @ d
    return -x0 + (x - a * x0) / s


def np_solve(x, rows, euler_into_data=True):
    """Heun along per-sample descending time rows (B, M + 1); a step ending at t = 0 is Euler."""
    x = np.asarray(x, np.float64)
    for j in range(rows.shape[1] - 1):
        t, s = rows[:, j], rows[:, j + 1]
        h = (s - t)[:, None]
        live = t > s  # padded zero-length steps change nothing
        tt = np.where(live, t, 1.0)
        v1 = np_ideal_velocity(x, tt)
        euler = (s == 0) if euler_into_data else np.zeros_like(s, bool)
        ss = np.where(euler | ~live, tt, s)
        v2 = np_ideal_velocity(x + h * v1, ss)
        step = np.where(euler[:, None], h * v1, 0.5 * h * (v1 + v2))
        x = x + np.where(live[:, None], step, 0.0)
    return x


@pytest.fixture(scope="module")
def ideal():
    return ideal_denoiser_teacher(DATA, get_path("rf"))


def test_the_rule_names_the_singular_teachers(ideal):
    gmm = gmm_params(np.zeros((1, 2)), np.eye(2)[None] * 0.1, [1.0])
    assert ideal.euler_into_data  # the ideal denoiser on any path
    assert not gaussian_mixture_teacher(gmm, get_path("rf"), conditional=False).euler_into_data
    assert not gaussian_mixture_teacher(gmm, get_path("vp_cosine"), conditional=False).euler_into_data
    for name in ("vp_linear", "ddpm", "ddpm_linear"):  # sigma ~ sqrt(t) at the data
        assert gaussian_mixture_teacher(gmm, get_path(name), conditional=False).euler_into_data
    s = jnp.array([0.5, 0.0, 0.25])
    np.testing.assert_array_equal(np.asarray(solvers.into_data_is_euler(s, True)), [False, True, False])
    assert not np.any(np.asarray(solvers.into_data_is_euler(s, False)))


# per sample: (n, k) on a 4-interval uniform grid, 2 substeps; samples 0, 1 end at t = 0
N_GRID, JUMP_N, JUMP_K, MAX_JUMP, SUBSTEPS = 4, np.array([1, 2, 4, 4]), np.array([1, 2, 3, 4]), 4, 2


def np_jump_rows(n, k):
    grid = np.arange(N_GRID + 1) / N_GRID
    rows = []
    for nb, kb in zip(n, k):
        ts = [
            grid[nb - j] + (grid[nb - j - 1] - grid[nb - j]) * q / SUBSTEPS
            for j in range(kb)
            for q in range(SUBSTEPS)
        ]
        rows.append(ts + [grid[nb - kb]] * ((MAX_JUMP - kb) * SUBSTEPS + 1))
    return np.asarray(rows)


def test_teacher_jump_into_the_data_is_euler_on_a_singular_teacher(ideal):
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    grid = jnp.arange(N_GRID + 1, dtype=jnp.float32) / N_GRID
    args = (ideal, jnp.asarray(x), grid, jnp.asarray(JUMP_N), jnp.asarray(JUMP_K), MAX_JUMP, "heun", SUBSTEPS)
    got = np.asarray(teacher_jump(*args))  # "auto": the teacher's rule
    want = np_solve(x, np_jump_rows(JUMP_N, JUMP_K))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the jumps that end at t_1 > 0 are plain Heun, identical either way
    heun_at_zero = np.asarray(teacher_jump(*args, euler_into_data=False))
    np.testing.assert_allclose(heun_at_zero[2], want[2], rtol=1e-4, atol=1e-4)
    # Heun's stage at t = 0 (the old behaviour) moves the data-end targets by O(1), not O(1e-4)
    assert np.abs(heun_at_zero[:2] - want[:2]).max() > 1e-2


def _fixed_times(monkeypatch, module, n, k, m):
    n, k, m = (jnp.asarray(v, jnp.int32) for v in (n, k, m))

    def sample(rng, grid, batch, max_jump, *args, **kwargs):
        grid = jnp.asarray(grid, jnp.float32)
        return GridTimes(n, k, m, grid[n], grid[n - k], grid[m])

    monkeypatch.setattr(module, "sample_grid_times", sample)


# G(x, t, s) = x: the reconstruction loss is then |x_t - x_r|^2, the teacher's jump alone
STILL = Student(apply=lambda p, x, t, s, *a: 0.0 * x, path=get_path("rf"), form="euler", uses_s=True)


def _inputs(teacher):
    return LossInputs(teacher=teacher, student=STILL, ema={}, others={}, step=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("term", ["traflow_rec", "cd"])
def test_loss_targets_into_the_data_are_euler(monkeypatch, ideal, term):
    x0 = RNG.standard_normal((4, 3)).astype(np.float32)
    noise = RNG.standard_normal((4, 3)).astype(np.float32)
    if term == "cd":
        n, k = np.array([1, 1, 3, 4]), np.ones(4, int)
        cfg = {"grid": "uniform", "num_grid": N_GRID, "substeps": SUBSTEPS, "target": "online"}
        _fixed_times(monkeypatch, cd_module, n, k, np.zeros(4, int))
        # CD: d(G(x_t, t, 0), sg G(x_r, r, 0)) = |x_t - x_r|^2 for the still student
        max_jump = 1
    else:
        n, k = JUMP_N, JUMP_K
        cfg = {"grid": "uniform", "num_grid": N_GRID, "max_jump": MAX_JUMP, "substeps": SUBSTEPS}
        _fixed_times(monkeypatch, traflow_module, n, k, np.zeros(4, int))
        max_jump = MAX_JUMP
    fn = get_factory(term)(ml_collections.ConfigDict(cfg), STILL)
    loss, _ = fn(
        {}, _inputs(ideal), {"x": jnp.asarray(x0), "noise": jnp.asarray(noise)}, jax.random.PRNGKey(0)
    )
    t = n / N_GRID
    x_t = (1 - t)[:, None] * x0 + t[:, None] * noise
    grid = np.arange(N_GRID + 1) / N_GRID
    rows = []
    for nb, kb in zip(n, k):
        ts = [
            grid[nb - j] + (grid[nb - j - 1] - grid[nb - j]) * q / SUBSTEPS
            for j in range(kb)
            for q in range(SUBSTEPS)
        ]
        rows.append(ts + [grid[nb - kb]] * ((max_jump - kb) * SUBSTEPS + 1))
    x_r = np_solve(x_t, np.asarray(rows))
    want = np.mean(np.mean((x_t - x_r) ** 2, axis=1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_pairs_step_into_the_data_with_euler(ideal):
    pairs = teacher_pairs.generate_pairs(
        ideal, jax.random.PRNGKey(3), 8, batch_size=8, method="heun", num_steps=4
    )
    rows = np.tile(np.linspace(1.0, 0.0, 5), (8, 1))
    want = np_solve(pairs["noise"], rows)
    np.testing.assert_allclose(pairs["x"], want, rtol=1e-4, atol=1e-4)
    old = teacher_pairs.generate_pairs(
        ideal, jax.random.PRNGKey(3), 8, batch_size=8, method="heun", num_steps=4, euler_into_data=False
    )
    assert np.abs(old["x"] - want).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 2. CTM's jump sampler
# ---------------------------------------------------------------------------------------------


def np_joint(sampler, N=8, K=8):
    """P(n, k) (N + 1, K + 1) of the two samplers with p(k) ∝ k, from their definitions."""
    P = np.zeros((N + 1, K + 1))
    for n in range(1, N + 1):
        for k in range(1, min(n, K) + 1):
            if sampler == "ctm":  # k ∝ k on {1..K}, then n ~ U{k..N}
                P[n, k] = (k / (K * (K + 1) / 2)) / (N - k + 1)
            else:  # n ~ U{1..N}, then k ∝ k on {1..min(n, K)}
                P[n, k] = (1 / N) * k / (min(n, K) * (min(n, K) + 1) / 2)
    return P


@pytest.fixture(scope="module")
def draws():
    from fewstep_jax.losses.trajectory.grid import sample_grid_times

    grid = jnp.linspace(0.0, 1.0, 9)
    keys = jax.random.split(jax.random.PRNGKey(0), 40_000)
    out = {}
    for sampler in ("ctm", "start_first"):
        f = jax.jit(jax.vmap(lambda k, smp=sampler: sample_grid_times(k, grid, 8, 8, "linear", smp)))
        ts = f(keys)  # (batches, 8) each
        out[sampler] = tuple(np.asarray(v) for v in (ts.n, ts.k, ts.m))
    return out


def test_ctm_sampler_draws_one_jump_per_batch_then_the_start(draws):
    n, k, m = draws["ctm"]
    assert np.all(k == k[:, :1])  # one k per batch (sony/ctm's get_num_heun_step)
    assert np.all((k >= 1) & (k <= n) & (n <= 8)) and np.all((m >= 0) & (m <= n - k))
    # p(k) = k / 36 over batches
    np.testing.assert_allclose(
        np.bincount(k[:, 0], minlength=9)[1:] / len(k), np.arange(1, 9) / 36, atol=0.008
    )
    # the joint of (start, jump) against the closed form
    emp = np.zeros((9, 9))
    np.add.at(emp, (n.ravel(), k.ravel()), 1.0)
    np.testing.assert_allclose(emp / n.size, np_joint("ctm"), atol=0.004)
    # m ~ U{0..n-k}
    sel = m[(n - k) == 3]
    np.testing.assert_allclose(np.bincount(sel, minlength=4) / sel.size, 0.25, atol=0.01)


def test_the_two_samplers_mean_jump_and_full_jump():
    ks = np.arange(9)
    for sampler, mean_k, full in (("ctm", 17 / 3, 8 / 36), ("start_first", 10 / 3, 1 / 36)):
        P = np_joint(sampler)
        np.testing.assert_allclose(P.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose((P.sum(0) * ks).sum(), mean_k, rtol=1e-12)
        np.testing.assert_allclose(P[:, 8].sum(), full, rtol=1e-12)


def test_start_first_variant_is_kept(draws):
    n, k, _ = draws["start_first"]
    emp = np.zeros((9, 9))
    np.add.at(emp, (n.ravel(), k.ravel()), 1.0)
    np.testing.assert_allclose(emp / n.size, np_joint("start_first"), atol=0.003)
    assert abs(k.mean() - 10 / 3) < 0.02 and abs(draws["ctm"][1].mean() - 17 / 3) < 0.05
    assert abs((k == 8).mean() - 1 / 36) < 0.003 and abs((draws["ctm"][1] == 8).mean() - 8 / 36) < 0.01


@pytest.mark.parametrize(
    ("term", "cfg", "want"),
    [("ctm", {}, "ctm"), ("traflow", {}, "start_first"), ("traflow", {"jump_sampler": "ctm"}, "ctm")],
)
def test_terms_pass_their_sampler(monkeypatch, ideal, term, cfg, want):
    seen = []
    real = traflow_module.sample_grid_times
    monkeypatch.setattr(traflow_module, "sample_grid_times", lambda *a: seen.append(a[5]) or real(*a))
    opts = ml_collections.ConfigDict({"num_grid": 4, "max_jump": 4, "target": "online", **cfg})
    fn = get_factory(term)(opts, STILL)
    fn({}, _inputs(ideal), {"x": jnp.zeros((4, 3))}, jax.random.PRNGKey(0))
    assert seen == [want]


def test_ctm_recipe_uses_ctms_sampler():
    from fewstep_jax.recipes import distill_config

    assert distill_config("gmm8", "ctm", 2).losses.ctm.jump_sampler == "ctm"
    # TraFlow keeps the start-first sampler (measured: fewstep_jax/recipes/trajectory.py), CTM's as a variant
    assert distill_config("gmm8", "traflow", 2).losses.traflow.jump_sampler == "start_first"
    assert distill_config("gmm8", "traflow_ctm_sampler", 2).losses.traflow.jump_sampler == "ctm"


# ---------------------------------------------------------------------------------------------
# 3. DMD / DMD2's training setup
# ---------------------------------------------------------------------------------------------


@register("test_fid_main")
def _main_pulled_to_aux(cfg, student):
    """Main net a: (a - b)^2 with b the aux net's current params as the step gives them."""
    return lambda p, inputs, batch, rng: ((p["a"] - inputs.others["fake"]["b"]) ** 2, {})


@register("test_fid_aux")
def _aux_pulled_to_main(cfg, student):
    """Aux net b: (b - a)^2 with a the main net's params as the step gives them."""
    return lambda p, inputs, batch, rng: ((p["b"] - inputs.others["student"]["a"]) ** 2, {})


def _order_config(order):
    c = base.get_config()
    c.optim.warmup_steps, c.optim.lr, c.optim.schedule = 0, 1e-3, "constant"
    c.losses.test_fid_main = {"weight": 1.0}
    c.aux_nets.fake = {"losses": {"test_fid_aux": {"weight": 1.0}}, "optim": {"lr": 1e-3}, "order": order}
    return c


def np_adam_first(p, g, lr=1e-3, eps=1e-8):
    """Adam's first update (bias-corrected m = g, v = g^2)."""
    return p - lr * g / (abs(g) + eps)


@pytest.mark.parametrize("order", ["first", "after_main"])
def test_update_order_of_the_aux_network(order):
    a0, b0 = 0.0, 5e-4
    c = _order_config(order)
    init_a = lambda key: {"a": jnp.asarray(a0, jnp.float32)}
    init_b = lambda key: {"b": jnp.asarray(b0, jnp.float32)}
    state = create_state(c, init_a, {"fake": init_b})
    state, _ = jax.jit(make_step_fn(c, STILL, {"fake": STILL}))(state, None, {"x": jnp.zeros((2, 3))})
    # the aux always trains on the main network's params of the start of the step (the
    # generator's pre-update samples): b1 = adam(b0, 2 (b0 - a0))
    b1 = np_adam_first(b0, 2 * (b0 - a0))
    # "first" (TDM): the main network reads the updated aux; "after_main" (DMD2): the pre-update one
    a1 = np_adam_first(a0, 2 * (a0 - (b1 if order == "first" else b0)))
    np.testing.assert_allclose(float(state.aux["fake"]["params"]["b"]), b1, atol=1e-7)
    np.testing.assert_allclose(float(state.params["a"]), a1, atol=1e-7)
    assert np.sign(a1) == (-1 if order == "first" else 1)  # the two orders move a opposite ways here


def test_unknown_update_order_is_an_error():
    with pytest.raises(ValueError, match="order"):
        make_step_fn(_order_config("sideways"), STILL, {"fake": STILL})


def np_dmd2_karras_t(path_name, T=1000, smin=0.002, smax=80.0, rho=7.0):
    """DMD2's karras_sigmas (get_sigmas_karras, flipped: index 0 = sigma_min) as times of the path."""
    ramp = np.linspace(0, 1, T)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sig = sig[::-1]
    assert path_name == "rf"
    return sig / (1 + sig)  # rf: sigma_edm = t / (1 - t)


@pytest.mark.parametrize(("term", "lo", "hi"), [("dmd", 20, 980), ("dmd_fake", 0, 999)])
def test_dmd2_noise_levels_uniform_over_karras_indices(term, lo, hi):
    from fewstep_jax.losses.distribution_matching import dmd as dmd_module
    from fewstep_jax.recipes import distill_config

    c = distill_config("gmm8", "dmd2", 10)
    block = c.losses.dmd if term == "dmd" else c.aux_nets.fake.losses.dmd_fake
    defaults = dmd_module.DMD_DEFAULTS if term == "dmd" else dmd_module.DMD_FAKE_DEFAULTS
    opts = {**defaults, **{k: v for k, v in block.items() if k != "weight"}}
    assert opts["time_sampler"] == "karras"
    draw = dmd_module._time_sampler(get_path("rf"), opts, term)
    t = np.asarray(jax.jit(draw, static_argnums=1)(jax.random.PRNGKey(0), 200_000), np.float64)
    want_t = np_dmd2_karras_t("rf")  # ascending
    j = np.clip(np.searchsorted(want_t, t), 1, len(want_t) - 1)
    idx = np.where(np.abs(want_t[j - 1] - t) < np.abs(want_t[j] - t), j - 1, j)  # the nearest grid point
    np.testing.assert_allclose(t, want_t[idx], rtol=2e-5, atol=1e-6)  # every draw is a grid point
    assert idx.min() == lo and idx.max() == hi
    counts = np.bincount(idx - lo, minlength=hi - lo + 1)
    np.testing.assert_allclose(counts / counts.sum(), 1 / (hi - lo + 1), rtol=0.3)  # uniform over indices


def test_dmd_recipes_use_dmd2s_optimiser_and_tdm_keeps_its_own():
    from fewstep_jax.recipes import distill_config

    for name in ("dmd", "dmd2"):
        c = distill_config("gmm8", name, 10)
        assert (c.optim.name, c.optim.b1, c.optim.b2, c.optim.weight_decay) == ("adamw", 0.9, 0.999, 0.01)
        f = c.aux_nets.fake
        assert (f.optim.lr, f.optim.b1, f.optim.b2) == (c.optim.lr, 0.9, 0.999) and f.order == "after_main"
    assert distill_config("gmm8", "dmd2", 10).train.main_every == 5
    for name in ("tdm", "dmd2_tdm_setup"):  # TDM keeps TDM's setup; DMD2 with it is a labelled variant
        t = distill_config("gmm8", name, 10)
        assert (t.optim.name, t.optim.b1, t.optim.b2) == ("adam", 0.0, 0.95)
        assert t.aux_nets.fake.optim.lr == 5 * t.optim.lr and t.aux_nets.fake.order == "first"
    assert distill_config("gmm8", "dmd2_tdm_setup", 10).losses.dmd.to_dict() == {"weight": 1.0}


# ---------------------------------------------------------------------------------------------
# 4. MeanFlow's adaptive weight
# ---------------------------------------------------------------------------------------------

LINEAR = Student(apply=lambda p, x, t, s, *a: p["w"] * x, path=get_path("rf"), form="euler", uses_s=True)


@pytest.mark.parametrize(("p", "c"), [(1.0, 1e-3), (0.75, 0.05), (0.0, 1e-3)])
def test_meanflow_adaptive_weight_sums_the_error_over_dimensions(monkeypatch, p, c):
    from fewstep_jax.losses.trajectory import meanflow as meanflow_module

    seen = {}

    def target(student, params, x, t, s, v, label=None):  # a fixed target: 0.3 x_t
        seen["x"] = np.asarray(x, np.float64)
        return 0.3 * x

    monkeypatch.setattr(meanflow_module, "meanflow_target", target)
    cfg = ml_collections.ConfigDict({"velocity": "conditional", "adaptive_p": p, "adaptive_c": c})
    fn = get_factory("meanflow")(cfg, LINEAR)
    x0 = jnp.asarray(RNG.standard_normal((16, 6)), jnp.float32)
    w = 0.8
    loss_fn = lambda q: fn(q, _inputs(None), {"x": x0}, jax.random.PRNGKey(2))[0]
    loss, grad = jax.value_and_grad(loss_fn)({"w": jnp.asarray(w, jnp.float32)})
    # numpy from MeanFlow's equations: e = g - sg(target), err_sum = sum_D e^2, weight sg(1/(err_sum + c)^p),
    # loss = mean_b[mean_D(e^2) * weight] (MeanFlow's err_sum / sg((err_sum + c)^p) divided by D)
    x = seen["x"]
    e = (w - 0.3) * x
    err_sum = (e**2).sum(1)
    weight = 1.0 / (err_sum + c) ** p
    np.testing.assert_allclose(float(loss), np.mean(e**2, axis=1) @ weight / len(x), rtol=1e-5)
    dw = np.mean(weight * np.mean(2 * e * x, axis=1))  # the weight under stop-gradient
    np.testing.assert_allclose(float(grad["w"]), dw, rtol=1e-5)
