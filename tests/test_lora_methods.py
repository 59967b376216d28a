"""Every distillation method trains a LoRA student (fewstep_jax/lora) in the project's jitted train
step: the recipes' own loss terms, optimisers and EMA on a small text-conditioned Linen network
whose frozen base is the teacher's params. Only the adapters are in the state and move; the teacher
is untouched; TDM / DMD's fake score is a LoRA on the same base or a full copy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fewstep_jax.lora import adapters as lora
from fewstep_jax.paths import DDPM, RectifiedFlow
from fewstep_jax.pipelines.denoiser import latent_student_apply, latent_teacher
from fewstep_jax.recipes import base, trajectory
from fewstep_jax.recipes import distribution_matching as dm
from fewstep_jax.recipes import tcd as tcd_recipes
from fewstep_jax.students import Student
from fewstep_jax.train.state import create_state
from fewstep_jax.train.step import make_train_step

pytest.importorskip("qwix")  # lora_module imports it

B, L, D, HW, C = 4, 3, 8, 4, 4
SPEC = lora.LoraSpec(targets=r".*(text_proj|conv_out)", rank=2, alpha=2.0, convs=True)


class TextConv(nn.Module):
    """A small text-conditioned denoiser: conv, the masked mean of the text states and a sin
    timestep embedding as a per-channel shift, conv out."""

    @nn.compact
    def __call__(self, x, timestep, cond):
        m = cond["text_mask"][..., None]
        text = (cond["text_states"] * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        emb = jnp.concatenate([text, jnp.sin(timestep[:, None] / jnp.array([10.0, 100.0, 1000.0]))], -1)
        h = nn.Conv(8, (3, 3), name="conv_in")(x) + nn.Dense(8, name="text_proj")(emb)[:, None, None, :]
        return nn.Conv(C, (3, 3), name="conv_out")(nn.silu(h))


def _cond(seed: int, batch: int = B) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "text_states": jnp.asarray(rng.standard_normal((batch, L, D)), jnp.float32),
        "text_mask": jnp.ones((batch, L), jnp.float32),
    }


def _x(seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, HW, HW, C)), jnp.float32)


MODULE = TextConv()
INPUTS = {"x": _x(0), "timestep": jnp.zeros(B), "cond": _cond(0)}
BASE = MODULE.init(jax.random.PRNGKey(0), **INPUTS)["params"]
WRAPPED = lora.lora_module(MODULE, SPEC)


def _plain(p, x, k, c):
    return MODULE.apply({"params": p}, x, k, c)


def _on_base(p, x, k, c):
    return WRAPPED.apply({"params": p.full()}, x, k, c)


# (recipe, path, the student's form and prediction): the recipes' terms; TraFlow / CTM / CD train a
# flow-map student without an s input (s on the fixed grid), which is what a LoRA file can carry
METHODS = {
    "tcd": (tcd_recipes.tcd, DDPM(), "semilinear", "eps"),
    "lcm": (tcd_recipes.lcm, DDPM(), "semilinear", "eps"),
    "tdm": (lambda c: dm.tdm(c, (4,)), DDPM(), "semilinear", "eps"),
    "dmd2": (lambda c: dm.dmd(c, main_every=1), DDPM(), "semilinear", "eps"),
    "traflow": (lambda c: trajectory.traflow(c, uses_s=False), RectifiedFlow(), "euler", "flow"),
    "ctm": (trajectory.ctm, RectifiedFlow(), "euler", "flow"),
    "cd": (trajectory.cd, RectifiedFlow(), "euler", "flow"),
}


def _run(method: str, fake_lora: bool = True):
    recipe, path, form, prediction = METHODS[method]
    c = base.get_config()
    c.testbed.path = "ddpm" if isinstance(path, DDPM) else "rf"
    recipe(c)
    c.train.num_steps, c.train.main_start, c.optim.warmup_steps = 10, 0, 0
    prediction_kind = "eps" if isinstance(path, DDPM) else "flow"
    teacher = latent_teacher(_plain, BASE, path, prediction_kind, (HW, HW, C), _cond(1, 1))
    apply = latent_student_apply(_on_base, path)
    student = Student(apply, path, form=form, prediction=prediction, uses_s=False, shares_base=True)
    adapters = lora.init_adapters(MODULE, SPEC, INPUTS, jax.random.PRNGKey(1))
    nets, aux_init = {}, {}
    if "fake" in c.aux_nets:
        # the fake score predicts in the teacher's kind, from the teacher's network
        if fake_lora:
            nets["fake"] = Student(
                apply, path, form="euler", prediction=prediction_kind, uses_s=False, shares_base=True
            )
            fake = lora.init_adapters(MODULE, SPEC, INPUTS, jax.random.PRNGKey(2))
        else:
            nets["fake"] = Student(
                latent_student_apply(_plain, path), path, prediction=prediction_kind, uses_s=False
            )
            fake = jax.tree.map(jnp.copy, BASE)
        aux_init["fake"] = lambda k, fake=fake: fake
    state = create_state(c, None, aux_init, params=jax.tree.map(jnp.copy, adapters))
    step = make_train_step(c, student, nets)
    for i in range(2):
        batch = {"x": _x(10 + i), "noise": _x(20 + i), "label": _cond(30 + i)}
        state, m = step(state, teacher, batch)
        assert np.isfinite(float(m["loss"])), (method, {k: float(v) for k, v in m.items()})
    return state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_a_lora_student(method):
    state = _run(method)
    flat = traverse_util.flatten_dict(state.params)
    assert flat and all(lora.is_adapter(p) for p in flat), "the state holds the adapters alone"
    for name, ema in state.ema.items():
        assert set(traverse_util.flatten_dict(ema)) == set(flat), f"EMA {name} is not adapters-only"
    assert all(np.any(np.asarray(b)) for _, b in lora.adapter_layers(state.params).values()), (
        "lora_b did not move"
    )
    if "fake" in state.aux:
        fake = state.aux["fake"]["params"]
        assert all(np.any(np.asarray(b)) for _, b in lora.adapter_layers(fake).values()), (
            "fake lora_b did not move"
        )
    # the teacher (the shared base) is an argument of the step: it is never donated or changed
    for a, b in zip(
        jax.tree.leaves(BASE), jax.tree.leaves(MODULE.init(jax.random.PRNGKey(0), **INPUTS)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dmd_fake_score_can_be_a_full_copy():
    state = _run("dmd2", fake_lora=False)
    fake = traverse_util.flatten_dict(state.aux["fake"]["params"])
    assert not any(lora.is_adapter(p) for p in fake)
    moved = [
        not np.array_equal(np.asarray(v), np.asarray(traverse_util.flatten_dict(BASE)[p]))
        for p, v in fake.items()
    ]
    assert any(moved)
