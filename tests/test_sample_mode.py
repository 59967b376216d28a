"""Mode ``sample``: a trained student / teacher sampled from its workdir at any NFE and sampler."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewstep_jax import samplers, solvers
from fewstep_jax.export.workdir import load_run_params
from fewstep_jax.main import save_config
from fewstep_jax.modes.sample import run, run_student, sample_workdir
from fewstep_jax.paths import RectifiedFlow
from fewstep_jax.teachers.neural import neural_teacher

TINY = {
    "model.width": 32,
    "train.batch_size": 64,
    "train.log_every": 6,
    "testbed.num_reference": 500,
    "eval.num_samples": 200,
    "ema.decay": 0.5,
    "optim.warmup_steps": 2,
}


def _set(c, overrides):
    for k, v in overrides.items():
        *head, last = k.split(".")
        node = c
        for h in head:
            node = node[h]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A tiny traflow student of gmm8 and a tiny class-conditional gmm8 teacher (12 steps each)."""
    from fewstep_jax.modes.distill import distill
    from fewstep_jax.modes.dryrun import load_config_file
    from fewstep_jax.modes.train_teacher import train_teacher
    from fewstep_jax.recipes import distill_config

    student_wd, teacher_wd = tmp_path_factory.mktemp("student"), tmp_path_factory.mktemp("teacher")
    cs = _set(distill_config("gmm8", "traflow", 12), dict(TINY, **{"sampler.nfes": (1, 2)}))
    distill(cs, str(student_wd), evaluate=False)
    save_config(cs, str(student_wd))
    ct = _set(
        load_config_file("configs/gmm8_teacher.py"),
        dict(
            TINY,
            **{
                "train.num_steps": 12,
                "eval.train_num_samples": 50,
                "eval.train_nfes": (4,),
                "eval.train_solvers": ("euler",),
            },
        ),
    )
    train_teacher(ct, str(teacher_wd))
    save_config(ct, str(teacher_wd))
    return (cs, student_wd), (ct, teacher_wd)


def sample_config(**over):
    from fewstep_jax.modes.dryrun import load_config_file

    c = load_config_file("configs/sample.py")
    c.sample.update(over)
    return c


def test_student_samples_are_the_sampler_chain(workdirs, tmp_path):
    (cs, wd), _ = workdirs
    out = run(sample_config(num=40, nfe=2, seed=3, out=str(tmp_path / "s")), str(wd))
    res = np.load(os.path.join(out, "samples.npz"))
    assert os.path.getsize(os.path.join(out, "samples.png")) > 1000
    assert res["x"].shape == (40, 2) and int(res["nfe"]) == 2 and str(res["name"]) == "traflow"
    np.testing.assert_array_equal(res["noise"], np.asarray(jax.random.normal(jax.random.PRNGKey(3), (40, 2))))
    params, _ = load_run_params(wd, "eval")
    grid = solvers.make_grid("uniform", 2, RectifiedFlow())
    want = samplers.sample(run_student(cs), params, jnp.asarray(res["noise"]), grid)
    assert np.abs(res["x"] - res["noise"]).max() > 1e-2
    np.testing.assert_allclose(res["x"], np.asarray(want), atol=1e-5, rtol=0)
    # gamma re-noises between jumps: other samples, the same ones again for the same seed
    a = sample_workdir(wd, 40, nfe=2, gamma=0.5, seed=3)
    b = sample_workdir(wd, 40, nfe=2, gamma=0.5, seed=3)
    assert np.abs(a["x"] - res["x"]).max() > 1e-3
    np.testing.assert_allclose(a["x"], b["x"], atol=1e-6, rtol=0)
    # default output folder under the workdir, named by the sampler
    default = run(sample_config(num=40, seed=3), str(wd))  # nfe: the run's largest sampler.nfes
    assert default == str(wd / "samples" / "traflow_nfe2_gamma0_seed3")
    np.testing.assert_allclose(np.load(os.path.join(default, "samples.npz"))["x"], want, atol=1e-5, rtol=0)


def test_teacher_samples_are_its_solver(workdirs, tmp_path):
    _, (ct, wd) = workdirs
    out = run(sample_config(num=24, nfe=4, solver="heun", label=-2, out=str(tmp_path / "t")), str(wd))
    res = np.load(os.path.join(out, "samples.npz"))
    np.testing.assert_array_equal(res["label"], np.arange(24) % 8)
    params, _ = load_run_params(wd, "eval")
    teacher = neural_teacher(ct.model, params, RectifiedFlow(), "flow", (2,), 8)
    grid = solvers.make_grid("uniform", 2, RectifiedFlow())
    want = teacher.solve(jnp.asarray(res["noise"]), grid, "heun", label=jnp.asarray(res["label"]))
    assert np.abs(res["x"] - res["noise"]).max() > 1e-2
    np.testing.assert_allclose(res["x"], np.asarray(want), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple"):
        sample_workdir(wd, 24, nfe=3, solver="heun")
    with pytest.raises(ValueError, match=r"sample\.label=9"):
        sample_workdir(wd, 24, nfe=4, label=9)


def test_missing_checkpoint_is_named(workdirs, tmp_path):
    (cs, _), _ = workdirs
    save_config(cs, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        sample_workdir(tmp_path, 4)
