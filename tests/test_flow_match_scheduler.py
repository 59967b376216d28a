"""FlowMatchEulerDiscreteScheduler (SD3, SD3.5, Flux) against diffusers itself: sigmas and timesteps
option by option, the step, the whole loop, and the loop the project's solvers and few-step
samplers run on the ``flow_match`` grid with an analytic rectified-flow teacher.

The pipelines' ``calculate_shift`` and Flux's latent packing are diffusers' own functions, taken
from the installed source files (importing the pipeline modules would load transformers, seconds).
"""

import ast
import functools
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm_module  # noqa: E402

from fewstep_jax import samplers, solvers  # noqa: E402
from fewstep_jax.errors import UserError  # noqa: E402
from fewstep_jax.evaluation import teacher_solvers  # noqa: E402
from fewstep_jax.paths import DDPM, RectifiedFlow  # noqa: E402
from fewstep_jax.schedules.flow_match_scheduler import (  # noqa: E402
    FLOW_MATCH_DEFAULTS,
    FlowMatchConfig,
    calculate_shift,
    flow_match_grid,
    flow_match_step,
    flux_pipeline_sigmas,
    image_seq_len,
)
from fewstep_jax.schedules.scheduler_config import read_scheduler_config, scheduler_config  # noqa: E402
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params  # noqa: E402

T = 1000


def _diffusers_function(relpath: str, name: str, namespace: dict | None = None):
    """The function (or method) ``name`` of diffusers' source file ``relpath``, compiled alone."""
    path = os.path.join(os.path.dirname(diffusers.__file__), relpath)
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    ns = {"torch": torch, "np": np, **(namespace or {})}
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), ns)
    return ns[name]


FLUX = "pipelines/flux/pipeline_flux.py"
SD3 = "pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py"
flux_calculate_shift = _diffusers_function(FLUX, "calculate_shift")
sd3_calculate_shift = _diffusers_function(SD3, "calculate_shift")


def _flux_seq_len(height, width):
    """Flux's ``latents.shape[1]`` from its own prepare_latents / _pack_latents."""
    fake = types.SimpleNamespace(
        vae_scale_factor=8,
        _pack_latents=_diffusers_function(FLUX, "_pack_latents"),
        _prepare_latent_image_ids=lambda *a: None,
    )
    randn = lambda shape, **kw: torch.zeros(shape)
    prepare = _diffusers_function(FLUX, "prepare_latents", {"randn_tensor": randn})
    latents, _ = prepare(fake, 1, 16, height, width, torch.float32, "cpu", None)
    return latents.shape[1]


def _sd3_seq_len(height, width, patch_size=2):
    fake = types.SimpleNamespace(vae_scale_factor=8)
    prepare = _diffusers_function(SD3, "prepare_latents", {"randn_tensor": lambda s, **kw: torch.zeros(s)})
    _, _, h, w = prepare(fake, 1, 16, height, width, torch.float32, "cpu", None).shape
    return (h // patch_size) * (w // patch_size)  # the pipeline's __call__


# (scheduler options, set_timesteps arguments); mu from the pipelines' own formula and token
# count; "flux": the sigmas FluxPipeline passes, linspace(1, 1/N, N)
MU_512 = flux_calculate_shift(_flux_seq_len(512, 512))
MU_1024 = flux_calculate_shift(_flux_seq_len(1024, 1024))
FLUX_OPTS = {"use_dynamic_shifting": True, "shift": 3.0}
CASES = [
    ({}, {}),
    ({"shift": 3.0}, {}),  # SD3 / SD3.5
    ({"shift": 2.7}, {}),
    ({"num_train_timesteps": 500, "shift": 1.5}, {}),
    (FLUX_OPTS, {"mu": MU_512, "sigmas": "flux"}),  # FluxPipeline at 512 px
    (FLUX_OPTS, {"mu": MU_1024, "sigmas": "flux"}),  # ... at 1024 px
    (FLUX_OPTS, {"mu": MU_1024}),  # float64 linspace, then the dynamic shift
    ({**FLUX_OPTS, "time_shift_type": "linear"}, {"mu": MU_512}),
    ({**FLUX_OPTS, "time_shift_type": "linear"}, {"mu": 2.0, "sigmas": "flux"}),
    ({"shift": 3.0, "shift_terminal": 0.1}, {}),
    ({**FLUX_OPTS, "shift_terminal": 0.05}, {"mu": MU_1024}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {}),
    ({"shift": 3.0, "use_exponential_sigmas": True}, {}),
    ({"shift": 3.0, "use_beta_sigmas": True}, {}),
    ({**FLUX_OPTS, "use_karras_sigmas": True, "shift_terminal": 0.2}, {"mu": MU_512, "sigmas": "flux"}),
    ({"shift": 3.0}, {"timesteps": lambda n: np.linspace(980.0, 15.5, n)}),  # returned as given
    ({"shift": 3.0}, {"sigmas": lambda n: np.linspace(0.9, 0.1, n)}),
]


def _set_kw(spec: dict, n: int) -> dict:
    """set_timesteps arguments of a case at N steps."""
    out = dict(spec)
    for k in ("sigmas", "timesteps"):
        if out.get(k) == "flux":
            out[k] = np.linspace(1.0, 1 / n, n)  # FluxPipeline.__call__
        elif callable(out.get(k)):
            out[k] = out[k](n)
    return out


def test_defaults_and_config_reading(tmp_path):
    ref = dict(FlowMatchEulerDiscreteScheduler().config)
    ref.pop("_use_default_values")
    assert ref == FLOW_MATCH_DEFAULTS
    assert read_scheduler_config(ref, "FlowMatchEulerDiscreteScheduler") == FlowMatchConfig()
    # a Flux-style scheduler_config.json as saved by diffusers
    FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2, max_image_seq_len=2048
    ).save_config(tmp_path)
    cfg = read_scheduler_config(tmp_path / "scheduler_config.json")
    assert cfg.cls == "FlowMatchEulerDiscreteScheduler" and cfg.use_dynamic_shifting and cfg.shift == 3.0
    assert cfg.mu(1024) == flux_calculate_shift(1024, 256, 2048, 0.4, 1.2)
    assert scheduler_config("flow_match", shift=3.0) == FlowMatchConfig(shift=3.0)


def test_calculate_shift_and_token_counts_match_the_pipelines():
    for hw in ((512, 512), (1024, 1024), (768, 1360), (1000, 520)):
        assert image_seq_len(*hw) == _flux_seq_len(*hw) == _sd3_seq_len(*hw), hw
        n = image_seq_len(*hw)
        assert calculate_shift(n) == flux_calculate_shift(n)
        assert calculate_shift(n, 256, 4096, 0.5, 1.16) == sd3_calculate_shift(n, 256, 4096, 0.5, 1.16)
    assert image_seq_len(1024, 1024) == 4096
    assert abs(MU_1024 - 1.15) < 1e-12
    np.testing.assert_array_equal(flux_pipeline_sigmas(7), np.linspace(1.0, 1 / 7, 7))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sigmas_and_timesteps_match_diffusers(case):
    options, spec = CASES[case]
    sch = FlowMatchEulerDiscreteScheduler(**options)
    cfg = read_scheduler_config(dict(sch.config), "flow_match")
    assert cfg.sigma_bounds() == (sch.sigma_max, sch.sigma_min)
    for n in (1, 4, 28):
        kw = _set_kw(spec, n)
        if cfg.shift_terminal and n == 1:  # one sigma, 1: the stretch is 0 / 0
            with np.errstate(invalid="ignore"):
                sch.set_timesteps(n, **kw)
            assert np.isnan(sch.sigmas[0].item())
            with pytest.raises(UserError, match="shift_terminal needs a last sigma below 1"):
                cfg.set_timesteps(n, **kw)
            continue
        sch.set_timesteps(n, **kw)
        ts, sig = cfg.set_timesteps(n, **kw)
        assert ts.dtype == sig.dtype == np.float32 and sig.shape == (n + 1,) and sig[-1] == 0.0
        # float32 on both sides from the same float64 / float32 arithmetic: equal, not close
        np.testing.assert_array_equal(sig, sch.sigmas.numpy(), err_msg=f"{options} {spec} n={n}")
        np.testing.assert_array_equal(ts, sch.timesteps.numpy(), err_msg=f"{options} {spec} n={n}")
        if spec.get("sigmas", "flux") == "flux" and "timesteps" not in spec:  # the grid of the solvers
            grid = flow_match_grid(n, cfg, mu=spec.get("mu"), flux_sigmas="sigmas" in spec)
            np.testing.assert_array_equal(grid, sch.sigmas.numpy())


def test_static_shift_and_dynamic_shift_move_the_schedule():
    """The cases are not vacuous: each option changes the sigmas of 4 steps."""
    base = FlowMatchConfig().set_timesteps(4)[1]
    seen = {base.tobytes()}
    for options, spec in CASES[1:-2]:
        sig = read_scheduler_config(options, "flow_match").set_timesteps(4, **_set_kw(spec, 4))[1]
        seen.add(sig.tobytes())
    assert len(seen) == len(CASES) - 2


def _noise_from(monkeypatch, noises):
    calls = iter(noises)
    monkeypatch.setattr(fm_module, "randn_tensor", lambda *a, **k: torch.from_numpy(np.array(next(calls))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_step_matches_diffusers(dtype, stochastic, monkeypatch):
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 4, 3, 3)).astype(np.float32)
    v = r.standard_normal((2, 4, 3, 3)).astype(np.float32)
    z = r.standard_normal((4, 2, 4, 3, 3)).astype(np.float32)
    tdt = getattr(torch, dtype)
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    sch.set_timesteps(4)
    _noise_from(monkeypatch, z)
    sig = sch.sigmas.numpy()
    xt, xj = torch.from_numpy(x).to(tdt), jnp.asarray(x, dtype)
    for i, t in enumerate(sch.timesteps):
        out = sch.step(torch.from_numpy(v * (i + 1)).to(tdt), t, xt).prev_sample
        ours = flow_match_step(
            jnp.asarray(v * (i + 1), dtype), sig[i], sig[i + 1], xj, z[i], stochastic=stochastic
        )
        assert ours.dtype == jnp.dtype(dtype) and out.dtype == tdt
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), out.float().numpy())
        xt, xj = out, ours


def _model(seed=0):
    """A fixed random velocity of (x, timestep), numpy float32."""
    r = np.random.default_rng(seed)
    A = (r.standard_normal((6, 6)) / np.sqrt(6)).astype(np.float32)
    b = r.standard_normal(6).astype(np.float32)
    return lambda x, t: x @ A * np.float32(0.5 + t / 1000.0) + b * np.float32(np.cos(t / 100.0))


def _diffusers_loop(sch, x, fn, kw, n):
    sch.set_timesteps(n, **kw)
    xt, traj = torch.from_numpy(x), [x]
    for t in sch.timesteps:
        xt = sch.step(torch.from_numpy(fn(xt.numpy(), float(t))), t, xt).prev_sample
        traj.append(xt.numpy())
    return traj


@pytest.mark.parametrize("case", [0, 1, 4, 7, 9, 11, 13])
@pytest.mark.parametrize("stochastic", [False, True])
def test_sampling_loop_matches_diffusers(case, stochastic, monkeypatch):
    options, spec = CASES[case]
    options = {**options, "stochastic_sampling": stochastic}
    cfg = read_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(**options).config), "flow_match")
    fn = _model(case)
    r = np.random.default_rng(1)
    x = r.standard_normal((3, 6)).astype(np.float32)
    for n in (1, 4, 28) if not cfg.shift_terminal else (4, 28):  # NaN sigmas at 1 (test above)
        z = r.standard_normal((n, 3, 6)).astype(np.float32)
        _noise_from(monkeypatch, z)
        ref = _diffusers_loop(FlowMatchEulerDiscreteScheduler(**options), x, fn, _set_kw(spec, n), n)
        _, ours = cfg.sample(
            lambda xx, t: jnp.asarray(fn(np.asarray(xx), float(t))),
            jnp.asarray(x),
            n,
            noises=z,
            return_trajectory=True,
            **_set_kw(spec, n),
        )
        assert len(ours) == len(ref) == n + 1
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the project's solvers and few-step samplers on the flow_match grid
# ---------------------------------------------------------------------------------------------


@functools.lru_cache
def _teacher():
    params = gmm_params([[0.8, 0.0], [-0.8, 0.5], [0.0, -0.9]], [np.eye(2) * 0.05] * 3, [0.3, 0.3, 0.4])
    return gaussian_mixture_teacher(params, RectifiedFlow(), conditional=False)


@functools.lru_cache
def _teacher_velocity():
    teacher = _teacher()
    return jax.jit(lambda x, t: teacher.velocity(x, jnp.full((x.shape[0],), t, jnp.float32)))


GRIDS = [
    ("flow_match:shift=3.0", {"shift": 3.0}, {}),
    (
        "flow_match:use_dynamic_shifting=true:shift=3.0:image_seq_len=4096:flux_sigmas=true",
        FLUX_OPTS,
        {"mu": MU_1024, "sigmas": "flux"},
    ),
    (
        "flow_match:shift=3.0:use_karras_sigmas=true:shift_terminal=0.1",
        {"shift": 3.0, "use_karras_sigmas": True, "shift_terminal": 0.1},
        {},
    ),
]


def _diffusers_teacher_loop(options, spec, x1, n):
    """diffusers' scheduler loop on the teacher's velocity at ``timestep / T`` (as FluxPipeline
    hands it to the transformer)."""
    vel = _teacher_velocity()
    fn = lambda x, t: np.array(vel(jnp.asarray(x), np.float32(t) / np.float32(T)))
    return _diffusers_loop(FlowMatchEulerDiscreteScheduler(**options), x1, fn, _set_kw(spec, n), n)[-1]


@pytest.mark.parametrize("grid_kind,options,spec", GRIDS)
def test_teacher_euler_on_the_grid_is_the_diffusers_loop(grid_kind, options, spec):
    """The teacher table's Euler solver on the ``flow_match`` grid equals diffusers'
    FlowMatchEulerDiscreteScheduler loop driving the same velocity; Heun runs on the same grid."""
    x1 = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    table = teacher_solvers.solver_samplers(_teacher(), ("euler", "heun"), grid_kind, batch_size=4)
    for n in (4, 28):
        ours = table["euler"](x1, n)
        ref = _diffusers_teacher_loop(options, spec, x1, n)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    heun = table["heun"](x1, 8)
    grid = solvers.make_grid(grid_kind, 4, RectifiedFlow())
    np.testing.assert_allclose(heun, np.asarray(_teacher().solve(jnp.asarray(x1), grid, "heun")), atol=1e-6)


def test_student_chain_on_the_grid_is_the_diffusers_loop():
    """A few-step sampler (samplers.chain) whose flow map is one teacher Euler step visits the
    grid exactly as diffusers' loop does."""
    grid_kind, options, spec = GRIDS[1]
    vel = _teacher_velocity()
    flow_map = lambda x, t, s: x + (s - t)[:, None] * vel(x, t[0])
    x1 = np.random.default_rng(2).standard_normal((5, 2)).astype(np.float32)
    for n in (4,):
        grid = solvers.make_grid(grid_kind, n, RectifiedFlow())
        ours = samplers.chain(flow_map, jnp.asarray(x1), grid, RectifiedFlow())
        np.testing.assert_allclose(np.asarray(ours), _diffusers_teacher_loop(options, spec, x1, n), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(UserError, match=r"unknown option 'shfit'.*did you mean 'shift'"):
        read_scheduler_config({"shfit": 3.0}, "flow_match")
    with pytest.raises(UserError, match="invert_sigmas=True is not supported"):
        read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True})
    with pytest.raises(UserError, match="time_shift_type 'cosine'"):
        scheduler_config("flow_match", time_shift_type="cosine")
    with pytest.raises(UserError, match="only one of"):
        scheduler_config("flow_match", use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(UserError, match="needs mu"):
        scheduler_config("flow_match", use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(UserError, match="num_steps entries"):
        FlowMatchConfig().set_timesteps(4, sigmas=[1.0, 0.5])
    with pytest.raises(UserError, match="mu or image_seq_len"):
        flow_match_grid(4, FlowMatchConfig(use_dynamic_shifting=True), mu=1.0, image_seq_len=4096)
    # a DDIM key in a flow-match config is an error; a DDIM config read as flow-match drops it
    with pytest.raises(UserError, match="beta_schedule"):
        read_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "beta_schedule": "linear"})
    assert (
        read_scheduler_config({"_class_name": "DDIMScheduler", "beta_end": 0.1}, "flow_match")
        == FlowMatchConfig()
    )


def test_grid_name_errors():
    rf = RectifiedFlow()
    with pytest.raises(UserError, match=r"time grid 'flow_match:shfit=3'.*'shfit'"):
        solvers.make_grid("flow_match:shfit=3", 4, rf)
    with pytest.raises(UserError, match="is not key=value"):
        solvers.make_grid("flow_match:3.0", 4, rf)
    with pytest.raises(UserError, match="stochastic_sampling is the scheduler's step"):
        solvers.make_grid("flow_match:stochastic_sampling=true", 4, rf)
    with pytest.raises(UserError, match="invert_sigmas"):
        solvers.make_grid("flow_match:invert_sigmas=true", 4, rf)
    with pytest.raises(UserError, match="needs mu"):
        solvers.make_grid("flow_match:use_dynamic_shifting=true", 4, rf)
    with pytest.raises(ValueError, match="rectified-flow time grid"):
        solvers.make_grid("flow_match", 4, DDPM())
    with pytest.raises(ValueError, match="unknown time grid 'flow_matc'"):
        solvers.make_grid("flow_matc", 4, rf)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        solvers.make_grid("flow_match", 0, rf)
