"""The ``<term>/teacher_nfe`` metric equals the teacher evaluations the train step really makes.

The independent count wraps the teacher's ``apply`` with ``jax.debug.callback`` that adds the
batch size of every evaluation to a Python counter, and runs one jitted train step of the recipe.
A Python counter in the wrapper would count *traces* (a ``lax.scan`` of 32 solver steps traces its
body once); the callback runs in the compiled program, once per executed evaluation (each scan
iteration, each guidance branch), so ``sum(batch sizes) / B`` is the exact evaluations per example.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from fewstep_jax.data import NoiseSource
from fewstep_jax.losses.api import teacher_evals_per_call
from fewstep_jax.recipes import distill_config
from fewstep_jax.testbeds import make_testbed_from_config, teacher_data_source
from fewstep_jax.train.networks import distill_nets
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import make_step_fn

B = 16
# hand count per example: traflow recipes jump K = 8 grid intervals x 4 Heun substeps, padded to
# the longest jump (8 * 4 * 2 = 64), plus variant A's velocity target (1); CD one Heun step; TCD /
# LCM one DDIM step (x2 guided); TDM / DMD one teacher x0 (x2 with guidance 2); shortcut: none
EXPECTED = {
    "traflow": 65.0,
    "traflow_velB": 64.0,
    "ctm": 64.0,
    "cd": 2.0,
    "meanflow": 1.0,
    "tcd": 1.0,
    "tcd_cfg": 2.0,
    "lcm": 1.0,
    "tdm": 1.0,
    "tdm_cfg": 2.0,
    "dmd": 1.0,
    "shortcut": None,
}
# one jitted step each; the default run covers a padded jump (traflow), a one-step solve (cd), CFG
# in a DDIM jump (tcd_cfg) and in a DM target (tdm_cfg), and a teacher-free term (shortcut)
FAST = ("traflow", "cd", "tcd_cfg", "tdm_cfg", "shortcut")


def _config(name: str):
    recipe = "tdm" if name == "tdm_cfg" else name
    c = distill_config("gmm8", recipe, 4)
    models = [c.model] + [a.model for a in c.aux_nets.values()]
    for m in models:
        m.width, m.num_layers, m.emb_dim = 16, 1, 8
    c.train.batch_size = B
    c.testbed.num_reference = 100
    if name == "tdm_cfg":  # CFG baked into the target: a conditional run
        c.losses.tdm.guidance = 2.0
        for m in models:
            m.num_classes = 8
    return c


def _counting(teacher, log: list):
    apply = teacher.apply

    def counted(params, x, t, label):
        jax.debug.callback(lambda xx: log.append(int(xx.shape[0])), x)
        return apply(params, x, t, label)

    return teacher.replace(apply=counted)


@functools.cache
def _one_step(name: str):
    c = _config(name)
    tb = make_testbed_from_config(c)
    main, aux = distill_nets(c, tb.teacher, tb.teacher.data_shape)
    state = create_state(c, main.init, {n: a.init for n, a in aux.items()})
    step = jax.jit(make_step_fn(c, main.student, {n: a.student for n, a in aux.items()}))
    if c.student.data == "noise":
        nc = int(c.model.get("num_classes", 0)) or None
        source = NoiseSource(tb.teacher.data_shape, B, 0, nc, 0, 1)
    else:
        source = teacher_data_source(c, tb)
    batch = {k: jnp.asarray(v) for k, v in source.batch(0).items()}
    log: list[int] = []
    _, metrics = step(state, _counting(tb.teacher, log), batch)
    jax.effects_barrier()
    return c, {k: float(v) for k, v in metrics.items()}, sum(log) / B


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPECTED]
)
def test_teacher_nfe_metric_counts_the_real_evaluations(name):
    c, metrics, counted = _one_step(name)
    metrics = dict(metrics)
    keys = [k for k in metrics if k.endswith("/teacher_nfe")]
    expected = EXPECTED[name]
    if expected is None:
        assert keys == [] and counted == 0.0
        return
    assert keys == [f"{t}/teacher_nfe" for t in c.losses], keys  # the generator term only (TDM/DMD)
    assert counted == expected, (name, counted)
    assert sum(metrics[k] for k in keys) == counted


def test_unpadded_nfe_is_the_cost_of_each_samples_own_jump():
    _, m, counted = _one_step("traflow")
    k_mean = m["traflow/traflow/jump"]
    assert 1.0 <= k_mean < 8.0
    assert m["traflow/unpadded_nfe"] == pytest.approx(2 * 4 * k_mean + 1, rel=1e-6)
    assert m["traflow/unpadded_nfe"] < m["traflow/teacher_nfe"] == counted


def test_guidance_costs_an_unconditional_call_unless_exactly_one():
    assert teacher_evals_per_call(1.0) == teacher_evals_per_call(1) == 1
    assert teacher_evals_per_call(2.0) == 2
    assert teacher_evals_per_call(jnp.ones((4,))) == 2  # an array always takes the CFG branch
