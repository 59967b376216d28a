"""The text-conditioned latent teacher (fewstep_jax/pipelines/denoiser.py, Teacher.null_condition):
the network at diffusers' timestep, guidance with the null condition, and TCD / TDM / TraFlow / DMD
terms running on it with a conditioning pytree as their label."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewstep_jax.losses.api import LossInputs, get_factory
from fewstep_jax.paths import DDPM, RectifiedFlow
from fewstep_jax.pipelines.denoiser import (
    diffusers_timestep,
    latent_student_apply,
    latent_teacher,
    path_of_scheduler,
)
from fewstep_jax.schedules.scheduler_config import read_scheduler_config
from fewstep_jax.students import Student
from fewstep_jax.teachers.base import batch_condition

B, L, D, HW, C = 2, 3, 8, 4, 4


def _cond(seed: int, batch: int = B) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, L), np.float32)
    mask[:, -1] = 0.0  # a padded token
    return {
        "text_states": jnp.asarray(rng.standard_normal((batch, L, D)), jnp.float32),
        "text_mask": jnp.asarray(mask),
    }


def _x(seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, HW, HW, C)), jnp.float32)


def test_scheduler_config_decides_path_and_prediction():
    sd = read_scheduler_config(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "prediction_type": "v_prediction"}
    )  # fmt: skip
    path, kind = path_of_scheduler(sd)
    assert isinstance(path, DDPM) and kind == "v" and path.schedule == "scaled_linear"
    np.testing.assert_allclose(
        path.alphas_cumprod(), sd.alphas_cumprod(), rtol=1e-5
    )  # float64 vs float32 table
    fm = read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    path, kind = path_of_scheduler(fm)
    assert isinstance(path, RectifiedFlow) and kind == "flow"
    np.testing.assert_allclose(diffusers_timestep(path, jnp.array([0.25, 1.0])), [250.0, 1000.0])


def test_teacher_is_the_network_at_diffusers_timesteps(small):
    params, denoise = small
    x, cond = _x(0), _cond(1)
    for path, t, k in [
        (DDPM(), jnp.array([1 / 1000, 0.5]), np.array([0.0, 499.0])),  # t = (k + 1) / T
        (RectifiedFlow(), jnp.array([0.3, 1.0]), np.array([300.0, 1000.0])),  # timestep = sigma T
    ]:
        teacher = latent_teacher(denoise, params, path, "eps", (HW, HW, C), _cond(2, 1))
        want = denoise(params, x, jnp.asarray(k, jnp.float32), cond)
        np.testing.assert_allclose(teacher.predict(x, t, cond), want, rtol=1e-5, atol=1e-5)


def test_guidance_and_an_absent_condition_use_the_null_condition(small):
    params, denoise = small
    x, cond, null = _x(3), _cond(4), _cond(5, 1)
    teacher = latent_teacher(denoise, params, DDPM(), "eps", (HW, HW, C), null)
    k = np.array([700.0, 700.0])
    run = lambda c: denoise(params, x, jnp.asarray(k, jnp.float32), c)
    p_c, p_u = run(cond), run(batch_condition(null, B))
    t = jnp.full((B,), 701 / 1000)
    np.testing.assert_allclose(
        teacher.predict(x, t, cond, guidance=4.5), p_u + 4.5 * (p_c - p_u), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(teacher.predict(x, t, None), p_u, rtol=1e-5, atol=1e-5)
    assert teacher.conditional
    with pytest.raises(ValueError, match="no batch axis of 1 or 2"):
        teacher.predict(x, t, _cond(6, 3))


class TextConv(nn.Module):
    """A small text-conditioned denoiser (compiles in seconds inside every loss): conv, plus the
    masked mean of the text states and the timestep's sin embedding as a per-channel shift."""

    @nn.compact
    def __call__(self, x, timestep, cond):
        m = cond["text_mask"][..., None]
        text = (cond["text_states"] * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        emb = jnp.concatenate([text, jnp.sin(timestep[:, None] / jnp.array([10.0, 100.0, 1000.0]))], -1)
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(emb)[:, None, None, :]
        return nn.Conv(C, (3, 3))(nn.silu(h))


@pytest.fixture(scope="module")
def small():
    module = TextConv()
    params = module.init(jax.random.PRNGKey(0), _x(0), jnp.zeros(B), _cond(0))["params"]
    return params, lambda p, x, k, c: module.apply({"params": p}, x, k, c)


# (term, options): the defaults of each method on the DDPM path, tiny grids
TERMS = [
    ("tcd", {}),
    ("traflow", {"num_grid": 4}),
    ("tdm", {}),
    ("dmd", {}),
]


@pytest.mark.parametrize("name, opts", TERMS, ids=[n for n, _ in TERMS])
def test_methods_run_on_the_latent_teacher_with_a_conditioning_pytree(small, name, opts):
    params, denoise = small
    path = DDPM()
    teacher = latent_teacher(denoise, params, path, "eps", (HW, HW, C), _cond(7, 1))
    student = Student(
        latent_student_apply(denoise, path), path, form="semilinear", prediction="eps", uses_s=False
    )
    term = get_factory(name)(ml_collections.ConfigDict(opts), student)
    batch = {"x": _x(8), "noise": _x(9), "label": _cond(10)}
    shifted = jax.tree.map(lambda p: p * 1.01, params)  # the fake score / EMA: other arrays

    def loss(sp, tp, fp):
        inputs = LossInputs(
            teacher=teacher.replace(params=tp), student=student, ema={"target": fp}, others={"fake": fp},
            step=jnp.zeros((), jnp.int32), nets=(("fake", student),),
        )  # fmt: skip
        return term(sp, inputs, batch, jax.random.PRNGKey(11))[0]

    value, (g_s, g_t, g_f) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, params, shifted)
    assert np.isfinite(float(value))
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g_t)), "teacher received gradient"
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g_f)), "fake / EMA received gradient"
    assert sum(float(jnp.abs(v).sum()) for v in jax.tree.leaves(g_s)) > 0, "student received no gradient"


def test_teacher_table_solvers_take_a_conditioning_pytree(small):
    """The teacher table's diffusers solvers run batch by batch on the latent teacher: the rows of
    the conditioning pytree follow the rows of the noise."""
    from fewstep_jax.evaluation.teacher_solvers import diffusers_sampler

    params, denoise = small
    teacher = latent_teacher(denoise, params, DDPM(), "eps", (HW, HW, C), _cond(12, 1))
    cond = jax.tree.map(np.asarray, _cond(13))
    x1 = np.asarray(_x(14))
    whole = diffusers_sampler(teacher, "diffusers_ddim", batch_size=2, label=cond, guidance=3.0)(x1, 2)
    rows = diffusers_sampler(teacher, "diffusers_ddim", batch_size=1, label=cond, guidance=3.0)(x1, 2)
    np.testing.assert_allclose(rows, whole, rtol=1e-5, atol=1e-5)
    one = diffusers_sampler(
        teacher, "diffusers_ddim", label=jax.tree.map(lambda a: a[1:], cond), guidance=3.0
    )
    np.testing.assert_allclose(one(x1[1:], 2), whole[1:], rtol=1e-5, atol=1e-5)
