"""The jitted train step: sharded == unsharded, teacher passed not baked, non-finite handling,
EMA maths, aux networks with their own optimizer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax import parallel
from fewstep_jax.losses import api
from fewstep_jax.models import build_model
from fewstep_jax.paths import get_path
from fewstep_jax.recipes import base
from fewstep_jax.students import Student, model_apply
from fewstep_jax.teachers.neural import neural_teacher
from fewstep_jax.train.loop import Net, NonFiniteError, train
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import ema_decay_at, make_step_fn, make_train_step, state_shardings

STEPS, B = 3, 32


def _config(**losses):
    c = base.get_config()
    c.model.width, c.model.num_layers, c.model.emb_dim = 32, 1, 16
    c.optim.warmup_steps, c.optim.lr = 0, 1e-2
    c.ema.decay = 0.9
    c.train.num_steps = 100
    for k, v in (losses or {"flow_matching": {"weight": 1.0}}).items():
        c.losses[k] = v
    return c


def _net(c):
    model = build_model(c.model)
    student = Student(model_apply(model), get_path("rf"), prediction="flow", uses_s=False)
    init = lambda k: model.init(k, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    return student, init


def _batch(i):
    rng = np.random.default_rng([0, i])
    return {"x": rng.normal(size=(B, 2)).astype(np.float32)}


def _run(c, mesh_shape):
    student, init = _net(c)
    create = lambda: create_state(c, init)
    if mesh_shape is None:
        state, fn, put = create(), make_train_step(c, student), lambda b: b
    else:
        mesh = parallel.make_mesh(*mesh_shape)
        sh = state_shardings(jax.eval_shape(create), mesh, min_size=1024)
        state = jax.jit(create, out_shardings=sh)()
        fn = make_train_step(c, student, mesh=mesh, state_sharding=sh)
        put = lambda b: parallel.global_batch(b, mesh)
    losses = []
    for i in range(STEPS):
        state, m = fn(state, None, put(_batch(i)))
        losses.append(float(m["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def one_device():
    with jax.default_device(jax.devices()[0]):
        return _run(_config(), None)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_sharded_step_matches_one_device(one_device, mesh_shape):
    losses, state = _run(_config(), mesh_shape)
    np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_device[1].params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    kernel = state.params["blocks_0"]["dense1"]["kernel"]  # (32, 32) >= min_size
    assert kernel.sharding.is_fully_replicated == (mesh_shape[1] == 1)
    if mesh_shape[1] > 1:
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        assert not state.opt_state[1][0].mu["blocks_0"]["dense1"]["kernel"].sharding.is_fully_replicated


@api.register("test_distill_to_teacher")
def _distill_factory(cfg, student):
    """Regress the student's velocity onto the teacher's at t = 0.5 (reads the teacher)."""

    def term(params, inputs, batch, rng):
        x, t = batch["x"], jnp.full((batch["x"].shape[0],), 0.5)
        target = jax.lax.stop_gradient(inputs.teacher.velocity(x, t))
        return jnp.mean((student.velocity(params, x, t) - target) ** 2), {}

    return term


def test_teacher_is_an_argument_not_a_constant():
    c = _config(test_distill_to_teacher={"weight": 1.0})
    student, init = _net(c)
    state = create_state(c, init)
    tparams = jax.tree.map(lambda p: p + 0.5, init(jax.random.PRNGKey(3)))
    teacher = neural_teacher(c.model, tparams, "rf", "flow", (2,), 0)
    fn = jax.jit(make_step_fn(c, student))
    _, m1 = fn(state, teacher, _batch(0))
    teacher2 = teacher.replace(params=jax.tree.map(lambda p: p * 1.5, tparams))
    _, m2 = fn(state, teacher2, _batch(0))
    assert fn._cache_size() == 1  # new teacher weights: no recompilation
    assert float(m1["loss"]) != float(m2["loss"])
    # no (32, 32) array constant in the program; baking the teacher in (a closure) makes one
    baked = re.compile(r"constant dense<[^>]*> : tensor<32x32xf32>")
    assert not baked.search(fn.lower(state, teacher, _batch(0)).as_text())
    closed = jax.jit(lambda s, b: make_step_fn(c, student)(s, teacher, b))
    assert baked.search(closed.lower(state, _batch(0)).as_text())


def _nan_batch(i):
    b = _batch(i)
    if i == 2:
        b["x"][3, 0] = np.nan
    return b


class _Source:
    def __init__(self, fn):
        self.fn = fn

    def batch(self, step):
        return self.fn(step)


def _train_small(tmp_path, c, fn):
    student, init = _net(c)
    c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 5, 1, 1
    c.train.async_checkpoints = False
    return train(
        c,
        str(tmp_path),
        student_factory=lambda cfg: (Net(student, init), {}),
        teacher=None,
        data_source=_Source(fn),
    )


def test_nonfinite_stops_naming_step_and_term(tmp_path):
    c = _config()
    with pytest.raises(NonFiniteError, match=r"step 2 .*\['flow_matching'\]"):
        _train_small(tmp_path, c, _nan_batch)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == 2  # the bad state (step 3) was never saved


def test_skip_nonfinite_skips_and_counts(tmp_path):
    c = _config()
    c.train.skip_nonfinite = True
    state = _train_small(tmp_path, c, _nan_batch)
    assert int(state.num_skipped) == 1 and int(state.step) == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_ema_after_one_step():
    c = _config()
    c.ema.decay, c.ema.target_decay, c.ema.rampup_ratio = 0.9, 0.5, 0.0
    student, init = _net(c)
    state = create_state(c, init)
    old = state.params
    new_state, _ = jax.jit(make_step_fn(c, student))(state, None, _batch(0))
    for name, d in (("eval", 0.9), ("target", 0.5)):
        want = jax.tree.map(lambda o, n, d=d: d * o + (1 - d) * n, old, new_state.params)
        for a, b in zip(jax.tree.leaves(new_state.ema[name]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new_state.params))
    assert any(changed)


def test_ema_rampup_closed_form():
    # half-life in updates = min(log 0.5 / log decay, ratio * n)
    d = 0.99
    for n in (1, 10, 60):
        want = 0.5 ** (1.0 / (0.05 * n))
        np.testing.assert_allclose(float(ema_decay_at(d, 0.05, n)), want, rtol=1e-5)
    np.testing.assert_allclose(float(ema_decay_at(d, 0.05, 10_000)), d, rtol=1e-6)
    assert float(ema_decay_at(d, 0.0, 1)) == np.float32(d)
    assert float(ema_decay_at(0.0, 0.05, 1)) == 0.0


def test_ema_rampup_in_the_step():
    """The eval EMA ramps up with the updates so far; the target EMA keeps its fixed decay."""
    c = _config()
    c.ema.decay, c.ema.target_decay, c.ema.rampup_ratio = 0.99, 0.5, 0.5
    student, init = _net(c)
    state = create_state(c, init)
    step = jax.jit(make_step_fn(c, student))
    for i in range(3):
        old_eval, old_target = state.ema["eval"], state.ema["target"]
        state, _ = step(state, None, _batch(i))
        d = 0.5 ** (1.0 / (0.5 * (i + 1)))  # 0.25, 0.5, 0.63 < 0.99
        for name, dd, old in (("eval", d, old_eval), ("target", 0.5, old_target)):
            want = jax.tree.map(lambda o, n, dd=dd: dd * o + (1 - dd) * n, old, state.params)
            for a, b in zip(jax.tree.leaves(state.ema[name]), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@api.register("test_aux_pull")
def _aux_factory(cfg, student):
    """Aux net: regress its output at the main network's prediction (reads others['student'])."""

    def term(params, inputs, batch, rng):
        x, t = batch["x"], jnp.full((batch["x"].shape[0],), 0.3)
        main = inputs.net("student").network(inputs.others["student"], x, t)
        return jnp.mean((student.network(params, x, t) - main - 1.0) ** 2), {}

    return term


@api.register("test_main_uses_aux")
def _main_uses_aux(cfg, student):
    """Main net: a loss through the aux network's output (whose params must get no gradient)."""

    def term(params, inputs, batch, rng):
        x, t = batch["x"], jnp.full((batch["x"].shape[0],), 0.3)
        aux_out = inputs.net("fake").network(inputs.others["fake"], x, t)
        return jnp.mean((student.network(params, x, t) - aux_out) ** 2) + jnp.mean(x**2), {}

    return term


def test_aux_network_updates_with_its_own_optimizer():
    c = _config(test_main_uses_aux={"weight": 1.0})
    c.aux_nets.fake = {"losses": {"test_aux_pull": {"weight": 1.0}}, "optim": {"lr": 1e-3}, "update_every": 1}
    student, init = _net(c)
    state = create_state(c, init, {"fake": init})
    fn = jax.jit(make_step_fn(c, student, {"fake": student}))
    s1, m = fn(state, None, _batch(0))
    assert "fake/loss/test_aux_pull" in m and "loss/test_main_uses_aux" in m
    moved = lambda a, b: max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert moved(s1.aux["fake"]["params"], state.aux["fake"]["params"]) > 0
    assert moved(s1.params, state.params) > 0
    # the aux net's own adam: its first update has magnitude ~ its lr (1e-3), the main's ~1e-2
    assert moved(s1.aux["fake"]["params"], state.aux["fake"]["params"]) < 2e-3
    # the main params' gradient is that of its own loss only: recompute it by hand
    term = _main_uses_aux(None, student)
    from fewstep_jax.losses.api import LossInputs

    inputs = LossInputs(
        None,
        student,
        state.ema,
        {"fake": s1.aux["fake"]["params"]},
        state.step,
        (("fake", student), ("student", student)),
    )
    g = jax.grad(lambda p: term(p, inputs, _batch(0), None)[0])(state.params)
    np.testing.assert_allclose(
        float(m["grad_norm"]), float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("term", "path", "prediction", "kw"),
    [
        ("flow_matching", "rf", "flow", {"t_sampling": "logit_normal"}),
        ("diffusion", "ddpm", "eps", {"t_sampling": "discrete"}),
        ("diffusion", "vp_cosine", "v", {}),
    ],
)
def test_teacher_objectives_are_zero_at_the_exact_prediction(term, path, prediction, kw):
    """With one data point c, the exact prediction at x_t is known in closed form: loss = 0."""
    import ml_collections

    p = get_path(path)
    c = jnp.array([[0.7, -1.2]])

    def exact(params, x, t, s, label, guidance, num_steps, rngs, train):
        a, sig = p.alpha_sigma(t)
        eps = (x - a[:, None] * c) / sig[:, None]
        return p.from_x0_eps(prediction, jnp.broadcast_to(c, x.shape), eps, t) + params

    student = Student(exact, p, prediction=prediction, uses_s=False)
    fn = api.get_factory(term)(ml_collections.ConfigDict(kw), student)
    batch = {"x": jnp.tile(c, (64, 1))}
    loss, _ = fn(0.0, None, batch, jax.random.PRNGKey(0))
    assert float(loss) < 1e-6
    loss_off, _ = fn(0.1, None, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(loss_off), 0.01, rtol=1e-3)


def test_label_dropout_and_unknown_keys():
    from fewstep_jax.losses.flow_matching import drop_labels

    lab = drop_labels(jax.random.PRNGKey(0), jnp.arange(10000) % 8, 0.2)
    assert abs(float(jnp.mean(lab == -1)) - 0.2) < 0.02
    assert bool(jnp.all((lab == -1) | (lab == jnp.arange(10000) % 8)))
    with pytest.raises(ValueError, match="unknown config keys"):
        build_model_cfg = _config(flow_matching={"weight": 1.0, "tmin": 0.1})
        make_step_fn(build_model_cfg, _net(build_model_cfg)[0])
