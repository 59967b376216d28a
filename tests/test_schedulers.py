"""Every step-changing option of diffusers' DDIM / DDPM / LCM / TCD schedulers against diffusers itself.

Each case builds the diffusers scheduler from its options, reads *its own config* into
`SchedulerConfig` and runs both loops step by step on the same model outputs (a fixed random
affine function of (x, timestep), float32 on both sides) and the same injected noise. Both sides
compute in float32, and x0 = (x - sigma eps) / alpha multiplies rounding by up to 1 / alpha ~ 150 at
timestep 999: states are asserted equal to 1e-4 relative to their scale (measured: <= 3e-6, and
1.9e-5 where trailing spacing starts at timestep 999 of the linear betas, 1 / alpha = 156).
"""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_lcm, scheduling_tcd

from fewstep_jax.errors import UserError
from fewstep_jax.evaluation import teacher_solvers
from fewstep_jax.paths import DDPM, RectifiedFlow
from fewstep_jax.schedules import ddpm
from fewstep_jax.schedules.scheduler_config import DEFAULTS, read_scheduler_config, scheduler_config
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params

D = 6
SHAPE = (3, 2, D)  # diffusers' dynamic thresholding needs (B, C, ...) samples
CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "DDPMScheduler": DDPMScheduler,
    "LCMScheduler": LCMScheduler,
    "TCDScheduler": TCDScheduler,
}
MODULES = {
    "DDIMScheduler": scheduling_ddim,
    "DDPMScheduler": scheduling_ddpm,
    "LCMScheduler": scheduling_lcm,
    "TCDScheduler": scheduling_tcd,
}
BETAS = (
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"rescale_betas_zero_snr": True},
    {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    {"num_train_timesteps": 500},
    {"trained_betas": list(np.linspace(1e-3, 0.03, 1000))},
)


def _model(seed=0, scale=1.0):
    """A fixed random 'model' of (x, timestep) as a numpy function; large enough outputs that x0
    leaves [-1, 1] (so clipping and thresholding bite)."""
    r = np.random.default_rng(seed)
    A = (r.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    b = (scale * r.standard_normal(D)).astype(np.float32)

    def fn(x, t):
        return x @ A * np.float32(0.5 + t / 1000.0) + b * np.float32(np.cos(t / 100.0))

    return fn


def _run_diffusers(sch, cls, monkeypatch, x, fn, noises, num_steps, set_kw=None, **step_kw):
    calls = iter(noises)
    monkeypatch.setattr(MODULES[cls], "randn_tensor", lambda *a, **k: torch.from_numpy(np.array(next(calls))))
    sch.set_timesteps(num_steps, **(set_kw or {}))
    xt = torch.from_numpy(x)
    traj = [x]
    for t in sch.timesteps:
        out = torch.from_numpy(np.array(fn(xt.numpy(), int(t)), np.float32))
        xt = sch.step(out, t, xt, **step_kw).prev_sample
        traj.append(xt.numpy())
    return traj


def _compare(cls, options, monkeypatch, num_steps, atol=1e-4, seed=0, set_kw=None, **step_kw):
    """Runs diffusers' `cls(**options)` and our reading of its config; returns our final sample."""
    sch = CLASSES[cls](**options)
    ours_cfg = read_scheduler_config(dict(sch.config), cls)
    fn = _model(seed)
    r = np.random.default_rng(seed + 1)
    x = r.standard_normal(SHAPE).astype(np.float32)
    noises = r.standard_normal((num_steps, *SHAPE)).astype(np.float32)
    ref = _run_diffusers(sch, cls, monkeypatch, x, fn, noises, num_steps, set_kw, **step_kw)
    eta = step_kw.get("eta")
    _, ours = ours_cfg.sample(
        lambda xx, t: jnp.asarray(fn(np.asarray(xx), t)),
        jnp.asarray(x),
        num_steps,
        eta=eta,
        noises=noises,
        use_clipped_model_output=step_kw.get("use_clipped_model_output", False),
        return_trajectory=True,
        **(set_kw or {}),
    )
    np.testing.assert_array_equal(ours_cfg.timesteps(num_steps, **(set_kw or {})), sch.timesteps.numpy())
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert np.isfinite(b).all()
        # float32 on both sides: relative to the state's scale (x0 = x / sqrt(abar) is ~150 x at T)
        np.testing.assert_allclose(np.asarray(a), b, rtol=atol, atol=atol * max(1.0, np.abs(b).max()))
    return np.asarray(ours[-1])


# ---------------------------------------------------------------------------------------------
# config reading, tables, timesteps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(CLASSES))
def test_defaults_are_diffusers_defaults(cls):
    ref = dict(CLASSES[cls]().config)
    ref.pop("_use_default_values", None)
    assert set(ref) == set(DEFAULTS[cls])
    ours = read_scheduler_config({}, cls)
    for k, v in ref.items():
        assert getattr(ours, k) == v, k


@pytest.mark.parametrize("cls", list(CLASSES))
def test_alphas_cumprod_match_diffusers(cls):
    extra = ({"beta_schedule": "sigmoid"}, {"beta_schedule": "laplace"}) if cls == "DDPMScheduler" else ()
    for betas in BETAS + extra:
        for one in (True,) if cls == "DDPMScheduler" else (True, False):
            sch = (
                CLASSES[cls](**betas)
                if cls == "DDPMScheduler"
                else CLASSES[cls](set_alpha_to_one=one, **betas)
            )
            ours = read_scheduler_config(dict(sch.config), cls)
            ac = ours.alphas_cumprod()
            assert ac.dtype == np.float32 and ac.shape == sch.alphas_cumprod.shape
            np.testing.assert_allclose(
                ac, sch.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-7, err_msg=str(betas)
            )
            if cls != "DDPMScheduler":
                np.testing.assert_allclose(
                    ours.final_alpha_cumprod(), float(sch.final_alpha_cumprod), rtol=1e-6
                )
    # the default of the module-level helper is the DDPM path's scaled_linear table
    np.testing.assert_allclose(
        read_scheduler_config({}, "tcd").alphas_cumprod(), ddpm.alphas_cumprod(), rtol=2e-6
    )


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_timesteps_match_diffusers(n):
    for spacing, extra, cls in itertools.product(
        ("leading", "trailing", "linspace"),
        ({}, {"steps_offset": 1}, {"num_train_timesteps": 500}),
        ("DDIMScheduler", "DDPMScheduler"),
    ):
        if True:
            sch = CLASSES[cls](timestep_spacing=spacing, **extra)
            sch.set_timesteps(n)
            ours = read_scheduler_config(dict(sch.config), cls).timesteps(n)
            np.testing.assert_array_equal(ours, sch.timesteps.numpy(), err_msg=f"{spacing} {extra}")
    for cls in ("LCMScheduler", "TCDScheduler"):
        for extra, set_kw in (
            ({}, {}),
            ({"original_inference_steps": 20}, {}),
            ({"num_train_timesteps": 500}, {}),
            ({}, {"original_inference_steps": 30}),
            ({}, {"strength": 0.6}),
            ({"timestep_spacing": "trailing", "steps_offset": 3}, {}),  # read by neither class
        ):
            sch = CLASSES[cls](**extra)
            sch.set_timesteps(n, **set_kw)
            ours = read_scheduler_config(dict(sch.config), cls).timesteps(n, **set_kw)
            np.testing.assert_array_equal(ours, sch.timesteps.numpy(), err_msg=f"{cls} {extra} {set_kw}")


def test_config_errors_and_cross_class_reading(tmp_path):
    with pytest.raises(UserError, match=r"'clip_smaple'.*clip_sample"):
        read_scheduler_config({"clip_smaple": False}, "DDIMScheduler")
    # DDIM has no LCM options: an error in a DDIM config ...
    with pytest.raises(UserError, match="original_inference_steps"):
        read_scheduler_config({"_class_name": "DDIMScheduler", "original_inference_steps": 50})
    # ... but an LCM config read as DDIM drops them, as DDIMScheduler.from_config(lcm.config)
    lcm = LCMScheduler(clip_sample=True, timestep_scaling=3.0, beta_schedule="linear")
    lcm.save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    assert json.loads(path.read_text())["_class_name"] == "LCMScheduler"
    as_ddim = read_scheduler_config(path, "ddim")
    ref = DDIMScheduler.from_config(DDIMScheduler.load_config(tmp_path))  # as saved: no defaults list
    for k in DEFAULTS["DDIMScheduler"]:
        assert getattr(as_ddim, k) == ref.config[k], k
    assert read_scheduler_config(path).cls == "LCMScheduler"
    assert read_scheduler_config(path).timestep_scaling == 3.0
    # from_config of an in-memory config: options left at the source's defaults take the target's
    from_mem = read_scheduler_config(dict(DDIMScheduler().config), "tcd")
    assert (
        from_mem.beta_start == TCDScheduler.from_config(DDIMScheduler().config).config.beta_start == 0.00085
    )
    # a foreign class's keys are errors unless the caller drops them
    pndm = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "beta_schedule": "scaled_linear"}
    with pytest.raises(UserError, match="skip_prk_steps"):
        read_scheduler_config(pndm, "lcm")
    assert read_scheduler_config(pndm, "lcm", ignored=("skip_prk_steps",)).cls == "LCMScheduler"
    with pytest.raises(UserError, match="no _class_name"):
        read_scheduler_config({})
    with pytest.raises(UserError, match="unknown scheduler"):
        read_scheduler_config({}, "EulerDiscreteScheduler")
    with pytest.raises(UserError, match="timestep_spacing"):
        scheduler_config("ddim", timestep_spacing="uniform")
    with pytest.raises(UserError, match="beta_schedule"):
        scheduler_config("tcd", beta_schedule="cosine")
    with pytest.raises(UserError, match="prediction_type"):
        scheduler_config("lcm", prediction_type="flow")
    with pytest.raises(UserError, match="variance_type 'learned_range' is not supported"):
        scheduler_config("ddpm", variance_type="learned_range")
    with pytest.raises(UserError, match="beta_schedule 'sigmoid'"):
        scheduler_config("ddim", beta_schedule="sigmoid")  # DDPMScheduler's alone
    with pytest.raises(UserError, match="set_alpha_to_one"):
        scheduler_config("ddpm", set_alpha_to_one=False)
    with pytest.raises(UserError, match="has no eta"):
        scheduler_config("ddpm").sample(lambda x, t: x, jnp.zeros(SHAPE), 2, eta=0.5)


# ---------------------------------------------------------------------------------------------
# the loops, option by option
# ---------------------------------------------------------------------------------------------

DDIM_CASES = [
    ({}, {}),  # DDIMScheduler(): linear betas, clip_sample=True, leading
    ({"clip_sample": False}, {}),
    ({"clip_sample_range": 0.5}, {}),
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, {}),
    ({"thresholding": True, "sample_max_value": 0.7}, {}),  # max below 1: s = max_value
    ({"set_alpha_to_one": False}, {}),
    ({"timestep_spacing": "trailing"}, {}),
    ({"timestep_spacing": "linspace"}, {}),
    ({"steps_offset": 1}, {}),
    ({"prediction_type": "sample", "clip_sample": False}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ({"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, {}),
    (
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {},
    ),
    ({}, {"eta": 0.5}),
    ({"clip_sample_range": 0.5}, {"use_clipped_model_output": True}),
    ({"thresholding": True, "timestep_spacing": "trailing"}, {"eta": 1.0, "use_clipped_model_output": True}),
]


@pytest.mark.parametrize("options,step_kw", DDIM_CASES, ids=[f"{i}" for i in range(len(DDIM_CASES))])
def test_ddim_options_match_diffusers(options, step_kw, monkeypatch):
    for n in (1, 3, 4):
        _compare("DDIMScheduler", options, monkeypatch, n, **step_kw)


def test_ddim_options_change_the_result(monkeypatch):
    """The cases above are not vacuous: each option moves the sample on this model."""
    base = _compare("DDIMScheduler", {"clip_sample": False}, monkeypatch, 4)
    for options, step_kw in DDIM_CASES[:9] + DDIM_CASES[14:]:
        if options == {"clip_sample": False} and not step_kw:
            continue
        out = _compare("DDIMScheduler", options, monkeypatch, 4, **step_kw)
        assert np.abs(out - base).max() > 1e-3, (options, step_kw)


LCM_CASES = [
    {},
    {"clip_sample": True},
    {"clip_sample": True, "clip_sample_range": 0.8},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 2.0},
    {"timestep_scaling": 0.01},  # c_skip(t) = 0.25 / ((0.01 t)^2 + 0.25) is far from 0
    {"original_inference_steps": 20},
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction", "clip_sample": True},
    {"beta_schedule": "squaredcos_cap_v2"},
    {
        "beta_schedule": "linear",
        "beta_end": 0.02,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
    },
    {"timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False},  # read by nothing
]


@pytest.mark.parametrize("options", LCM_CASES, ids=[f"{i}" for i in range(len(LCM_CASES))])
def test_lcm_options_match_diffusers(options, monkeypatch):
    outs = [_compare("LCMScheduler", options, monkeypatch, n) for n in (1, 2, 4)]
    # not vacuous: each option moves the sample, except those LCMScheduler never reads
    moved = np.abs(outs[-1] - _compare("LCMScheduler", {}, monkeypatch, 4)).max()
    assert (moved == 0.0) if options in (LCM_CASES[0], LCM_CASES[-1]) else (moved > 1e-3), moved


DDPM_CASES = [
    {},  # DDPMScheduler(): linear betas, fixed_small, clip_sample=True, leading
    {"clip_sample": False},
    {"clip_sample_range": 0.5},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    {"variance_type": "fixed_small_log"},
    {"variance_type": "fixed_large"},
    {"timestep_spacing": "trailing"},  # the last step (timestep 249 at N = 4) still adds noise
    {"timestep_spacing": "linspace"},
    {"steps_offset": 1},
    {"prediction_type": "v_prediction", "beta_schedule": "sigmoid"},
    {"prediction_type": "sample", "beta_schedule": "laplace", "clip_sample": False},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
]


@pytest.mark.parametrize("options", DDPM_CASES, ids=[f"{i}" for i in range(len(DDPM_CASES))])
def test_ddpm_options_match_diffusers(options, monkeypatch):
    outs = [_compare("DDPMScheduler", options, monkeypatch, n) for n in (1, 3, 4)]
    moved = np.abs(outs[-1] - _compare("DDPMScheduler", {}, monkeypatch, 4)).max()
    # fixed_small_log is fixed_small through exp / log: the same sample up to rounding
    assert (moved < 1e-5) if options in (DDPM_CASES[0], DDPM_CASES[4]) else (moved > 1e-3), moved


TCD_CASES = [
    ({}, {}, None),
    ({}, {}, 0.0),
    ({}, {}, 1.0),
    ({"prediction_type": "sample"}, {}, 0.3),
    ({"prediction_type": "v_prediction"}, {}, 0.5),
    ({"original_inference_steps": 20}, {}, 0.3),
    ({}, {"original_inference_steps": 50}, 0.3),  # the "customised" origin 0..T-1
    ({}, {"strength": 0.6}, 0.3),
    ({"beta_schedule": "squaredcos_cap_v2"}, {}, 0.3),
    ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, {}, 0.3),
    # accepted by TCDScheduler, read by no step: the loop equals the default one
    (
        {"clip_sample": True, "clip_sample_range": 0.1, "thresholding": True, "set_alpha_to_one": False},
        {},
        0.3,
    ),
]


@pytest.mark.parametrize("options,set_kw,eta", TCD_CASES, ids=[f"{i}" for i in range(len(TCD_CASES))])
def test_tcd_options_match_diffusers(options, set_kw, eta, monkeypatch):
    kw = {} if eta is None else {"eta": eta}
    outs = [_compare("TCDScheduler", options, monkeypatch, n, set_kw=set_kw, **kw) for n in (1, 2, 4)]
    # not vacuous: each case moves the sample from the default loop, except the options TCD never reads
    moved = np.abs(outs[-1] - _compare("TCDScheduler", {}, monkeypatch, 4)).max()
    unread = options.get("clip_sample") or (not options and not set_kw and eta in (None, 0.3))
    assert (moved == 0.0) if unread else (moved > 1e-3), moved


def test_dynamic_threshold_formula():
    """Imagen's rule written out in numpy: s = clamp(quantile(|x|, p), 1, max); clip(x, -s, s) / s."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32) * np.array(
        [0.3, 1.0, 3.0, 10.0], np.float32
    ).reshape(4, 1, 1)
    out = np.asarray(ddpm.dynamic_threshold(jnp.asarray(x), 0.9, 4.0))
    for b in range(4):
        s = min(max(np.quantile(np.abs(x[b]).astype(np.float64), 0.9), 1.0), 4.0)
        np.testing.assert_allclose(out[b], np.clip(x[b], -s, s) / s, rtol=1e-6, atol=1e-6)
    assert np.abs(out[0] - x[0]).max() == 0.0  # s = 1 and |x| < 1: untouched


# ---------------------------------------------------------------------------------------------
# evaluation: the diffusers loop a user runs on the teacher
# ---------------------------------------------------------------------------------------------


def _ddpm_teacher():
    path = DDPM()  # scaled_linear: sigma(1) = 0.9976, so the latents' scale x1 / sigma(1) is seen
    params = gmm_params([[0.8, 0.0], [-0.8, 0.5]], [np.eye(2) * 0.05] * 2, [0.5, 0.5])
    teacher = gaussian_mixture_teacher(params, path, conditional=False)

    @functools.partial(jax.jit, static_argnums=2)
    def pred(x, k, kind):  # the teacher's output as the scheduler's prediction_type, at timestep k
        t = jnp.full((x.shape[0],), path.timestep_to_t(k))
        return path.convert(teacher.predict(x, t), teacher.prediction, kind, x, t)

    return path, teacher, pred


_TEACHER = _ddpm_teacher()


@pytest.mark.parametrize(
    "method,cls,options,step_kw,nfe",
    [
        ("diffusers_ddim", "DDIMScheduler", {}, {}, 4),
        (
            "diffusers_ddim:timestep_spacing=trailing:clip_sample=false:eta=0.5",
            "DDIMScheduler",
            {"timestep_spacing": "trailing", "clip_sample": False},
            {"eta": 0.5},
            3,
        ),
        (
            "diffusers_tcd:prediction_type=v_prediction",
            "TCDScheduler",
            {"prediction_type": "v_prediction"},
            {},
            3,
        ),
        ("diffusers_lcm:clip_sample=true", "LCMScheduler", {"clip_sample": True}, {}, 2),
        (
            "diffusers_ddpm:variance_type=fixed_large",
            "DDPMScheduler",
            {"variance_type": "fixed_large"},
            {},
            3,
        ),
    ],
)
def test_teacher_table_offers_the_diffusers_loop(method, cls, options, step_kw, nfe, monkeypatch):
    """solver_samplers' diffusers_* methods equal diffusers' scheduler run on the teacher's output
    (converted to the scheduler's prediction_type) from latents x1 / sigma(1), batch by batch."""
    path, teacher, pred = _TEACHER
    kind = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[options.get("prediction_type", "epsilon")]
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    x1 = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32) * path.prior_scale
    sampler = teacher_solvers.solver_samplers(teacher, ("euler", method), "uniform", batch_size=3)[method]
    ours = sampler(x1, nfe)
    ref = []
    for i in (0, 3):  # the sampler's batches and its noise draws, replayed into diffusers
        xb = x1[i : i + 3] / np.float32(path.prior_scale)
        z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), i), (nfe, *xb.shape)))
        fn = lambda x, k: np.asarray(pred(jnp.asarray(x), k, kind))
        sch = CLASSES[cls](**betas, **options)
        ref.append(_run_diffusers(sch, cls, monkeypatch, xb, fn, z, nfe, **step_kw)[-1])
    np.testing.assert_allclose(ours, np.concatenate(ref), rtol=1e-4, atol=1e-4)
    if cls in ("LCMScheduler", "TCDScheduler"):
        assert sampler(x1, 60) is None  # LCM / TCD schedules hold at most 50 steps


def test_diffusers_solver_name_errors():
    path = DDPM()
    with pytest.raises(UserError, match="DDPM path"):
        teacher_solvers.diffusers_scheduler("diffusers_ddim", RectifiedFlow())
    with pytest.raises(UserError, match="clip_smaple"):
        teacher_solvers.diffusers_scheduler("diffusers_ddim:clip_smaple=false", path)
    with pytest.raises(UserError, match="beta_schedule is set by the teacher"):
        teacher_solvers.diffusers_scheduler("diffusers_ddim:beta_schedule=linear", path)
    with pytest.raises(UserError, match="key=value"):
        teacher_solvers.diffusers_scheduler("diffusers_ddim:trailing", path)
    rf = _TEACHER[1].replace(path=RectifiedFlow())  # a table over several paths: no rows off DDPM
    assert (
        teacher_solvers.solver_samplers(rf, ("diffusers_tcd",), "uniform")["diffusers_tcd"](None, 4) is None
    )
    with pytest.raises(UserError, match="clip_smaple"):
        teacher_solvers.solver_samplers(rf, ("diffusers_ddim:clip_smaple=1",), "uniform")
    with pytest.raises(UserError, match="unknown teacher solver 'diffusers_ddm'"):
        teacher_solvers.solver_samplers(_TEACHER[1], ("euler", "diffusers_ddm"), "uniform")
    cfg, eta, clipped = teacher_solvers.diffusers_scheduler("diffusers_ddim:thresholding=true:eta=0.2", path)
    assert cfg.thresholding and cfg.clip_sample and eta == 0.2 and not clipped
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_custom_timesteps_match_diffusers(cls, monkeypatch):
    """``set_timesteps(timesteps=[...])``: each step goes to the next listed timestep."""
    custom = [999, 701, 302, 45]
    sch = CLASSES[cls]()
    fn = _model(4)
    r = np.random.default_rng(5)
    x = r.standard_normal(SHAPE).astype(np.float32)
    noises = r.standard_normal((len(custom), *SHAPE)).astype(np.float32)
    calls = iter(noises)
    monkeypatch.setattr(MODULES[cls], "randn_tensor", lambda *a, **k: torch.from_numpy(np.array(next(calls))))
    sch.set_timesteps(timesteps=custom)
    xt = torch.from_numpy(x)
    for t in sch.timesteps:
        xt = sch.step(torch.from_numpy(fn(xt.numpy(), int(t))), t, xt).prev_sample
    ours = read_scheduler_config(dict(sch.config), cls).sample(
        lambda xx, t: jnp.asarray(fn(np.asarray(xx), t)), jnp.asarray(x), timesteps=custom, noises=noises
    )
    np.testing.assert_allclose(
        np.asarray(ours), xt.numpy(), rtol=1e-4, atol=1e-4 * max(1.0, np.abs(xt.numpy()).max())
    )
