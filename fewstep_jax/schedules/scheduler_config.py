"""A diffusers scheduler as its users configure it: a ``scheduler_config.json`` (or dict) of
``DDIMScheduler``, ``DDPMScheduler``, ``LCMScheduler`` or ``TCDScheduler`` read into a
:class:`SchedulerConfig` that builds the same ``alphas_cumprod``, timesteps and sampling loop
(``schedules/*_scheduler.py``); one of ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux) into a
:class:`~fewstep_jax.schedules.flow_match_scheduler.FlowMatchConfig` (sigmas, timesteps, loop).

Defaults are those of the diffusers class (0.42), so ``read_scheduler_config({}, "DDIMScheduler")``
is ``DDIMScheduler()``: linear betas 1e-4..0.02, ``clip_sample=True``, ``leading`` spacing. Keys
starting with ``_`` (``_class_name``, ``_diffusers_version``) are ignored. Any other key the class
lacks is an error naming it, with two exceptions that follow diffusers' ``from_config``: a config
written by another of these classes (its ``_class_name``) may carry that class's own options,
which are dropped; and the options an in-memory ``scheduler.config`` lists under
``_use_default_values`` take the built class's defaults. Options that diffusers accepts but never
reads in a step (TCD's clipping, LCM / TCD's ``timestep_spacing``) are accepted and change
nothing, as there.

Tested option by option against diffusers in tests/test_schedulers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.schedules.ddim_scheduler import TIMESTEP_SPACINGS, ddim_sample, ddim_timesteps
from fewstep_jax.schedules.ddpm import (
    BETA_SCHEDULES,
    DDPM_ONLY_BETA_SCHEDULES,
    PREDICTION_TYPES,
    Array,
    ModelFn,
    X0Limit,
    beta_table,
    cumprod_alphas,
)
from fewstep_jax.schedules.ddpm_scheduler import VARIANCE_TYPES, ddpm_sample
from fewstep_jax.schedules.flow_match_scheduler import FLOW_MATCH, FLOW_MATCH_DEFAULTS, FlowMatchConfig
from fewstep_jax.schedules.lcm_scheduler import lcm_sample, lcm_timesteps
from fewstep_jax.schedules.tcd_scheduler import tcd_sample, tcd_timesteps

_SHARED = {
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
_CONSISTENCY = {
    **_SHARED,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "timestep_scaling": 10.0,
}
# every __init__ option of each diffusers class, at its default
DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_SHARED,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": True,
    },
    "DDPMScheduler": {
        **{k: v for k, v in _SHARED.items() if k != "set_alpha_to_one"},
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": True,
        "variance_type": "fixed_small",
    },
    "LCMScheduler": dict(_CONSISTENCY),
    "TCDScheduler": dict(_CONSISTENCY),
    FLOW_MATCH: dict(FLOW_MATCH_DEFAULTS),
}
SCHEDULER_CLASSES = tuple(DEFAULTS)
# the classes of a beta table (SchedulerConfig); the flow-match class builds a FlowMatchConfig
BETA_CLASSES = tuple(c for c in DEFAULTS if c != FLOW_MATCH)
_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "flow_match": FLOW_MATCH,
}
# the step's default eta of each class (DDIM's eta, TCD's gamma; DDPM and LCM have none)
DEFAULT_ETA = {"DDIMScheduler": 0.0, "DDPMScheduler": 0.0, "LCMScheduler": 0.0, "TCDScheduler": 0.3}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The options of one diffusers scheduler (hashable: a static jit argument).

    ``original_inference_steps`` and ``timestep_scaling`` exist for LCM / TCD only,
    ``variance_type`` for DDPM only (which has no ``set_alpha_to_one``).
    """

    cls: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    trained_betas: tuple[float, ...] | None
    clip_sample: bool
    clip_sample_range: float
    steps_offset: int
    prediction_type: str
    thresholding: bool
    dynamic_thresholding_ratio: float
    sample_max_value: float
    timestep_spacing: str
    rescale_betas_zero_snr: bool
    set_alpha_to_one: bool = True
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    variance_type: str = "fixed_small"

    def __post_init__(self):
        where = f"{self.cls} config"
        if self.cls not in BETA_CLASSES:
            raise UserError(f"unknown beta-table scheduler {self.cls!r}; expected one of {BETA_CLASSES}")
        schedules = BETA_SCHEDULES + (DDPM_ONLY_BETA_SCHEDULES if self.cls == "DDPMScheduler" else ())
        if self.trained_betas is None and self.beta_schedule not in schedules:
            raise UserError(f"{where}: beta_schedule {self.beta_schedule!r} is not one of {schedules}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"{where}: prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if self.cls in ("DDIMScheduler", "DDPMScheduler") and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(
                f"{where}: timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}"
            )
        if self.cls == "DDPMScheduler" and self.variance_type not in VARIANCE_TYPES:
            raise UserError(
                f"{where}: variance_type {self.variance_type!r} is not supported (one of {VARIANCE_TYPES}; "
                "learned variances need a model that predicts them)"
            )

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float32, as the diffusers class builds it."""
        betas = beta_table(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.trained_betas,
            self.rescale_betas_zero_snr,
        )
        return cumprod_alphas(betas)

    def final_alpha_cumprod(self) -> float:
        """What DDIM steps to below timestep 0 (DDPM always steps to 1)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])

    def x0_limit(self) -> X0Limit | None:
        """The step's clipping / thresholding of x0 (None for TCD, whose step never applies it)."""
        if self.cls == "TCDScheduler":
            return None
        lim = X0Limit(
            bool(self.clip_sample),
            float(self.clip_sample_range),
            bool(self.thresholding),
            float(self.dynamic_thresholding_ratio),
            float(self.sample_max_value),
        )
        return lim if lim.active else None

    def timesteps(
        self, num_steps: int, *, original_inference_steps: int | None = None, strength: float = 1.0
    ) -> np.ndarray:
        """``set_timesteps(num_steps, original_inference_steps=..., strength=...)`` (descending int64);
        the last two are LCM / TCD's arguments."""
        T = self.num_train_timesteps
        if self.cls in ("DDIMScheduler", "DDPMScheduler"):
            if original_inference_steps is not None or strength != 1.0:
                raise UserError(
                    f"{self.cls}.set_timesteps takes neither original_inference_steps nor strength"
                )
            return ddim_timesteps(num_steps, T, self.steps_offset, self.timestep_spacing)
        if self.cls == "LCMScheduler":
            steps = (
                self.original_inference_steps
                if original_inference_steps is None
                else original_inference_steps
            )
            return lcm_timesteps(num_steps, steps, num_train_timesteps=T, strength=strength)
        return tcd_timesteps(
            num_steps,
            original_inference_steps,
            default_original_inference_steps=self.original_inference_steps,
            num_train_timesteps=T,
            strength=strength,
        )

    def sample(
        self,
        model_fn: ModelFn,
        x: Array,
        num_steps: int | None = None,
        *,
        timesteps=None,
        eta: float | None = None,
        noises=None,
        use_clipped_model_output: bool = False,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
        return_trajectory: bool = False,
    ):
        """The diffusers sampling loop: ``set_timesteps(num_steps)`` (or the given ``timesteps``),
        then ``step`` per timestep on ``model_fn(x, timestep)``.

        ``eta``: DDIM's eta (default 0) or TCD's gamma (default 0.3, the step's default); DDPM and LCM
        have none. ``noises``: the injected noise, (N, ...) for DDPM and for DDIM with eta > 0,
        (N - 1, ...) for LCM and for TCD with gamma > 0. ``use_clipped_model_output``: DDIM's step argument.
        """
        if (num_steps is None) == (timesteps is None):
            raise UserError("pass exactly one of num_steps and timesteps")
        if timesteps is None:
            timesteps = self.timesteps(
                num_steps, original_inference_steps=original_inference_steps, strength=strength
            )
        abar = self.alphas_cumprod()
        eta = DEFAULT_ETA[self.cls] if eta is None else float(eta)
        if self.cls == "DDIMScheduler":
            return ddim_sample(
                model_fn,
                x,
                timesteps,
                abar,
                eta,
                noises,
                self.prediction_type,
                self.num_train_timesteps,
                self.final_alpha_cumprod(),
                return_trajectory,
                x0_limit=self.x0_limit(),
                use_clipped_model_output=use_clipped_model_output,
            )
        if use_clipped_model_output:
            raise UserError(f"use_clipped_model_output is a DDIMScheduler.step argument, not {self.cls}'s")
        if eta and self.cls in ("DDPMScheduler", "LCMScheduler"):
            raise UserError(f"{self.cls}.step has no eta")
        if self.cls == "DDPMScheduler":
            return ddpm_sample(
                model_fn,
                x,
                timesteps,
                abar,
                noises,
                self.prediction_type,
                self.variance_type,
                return_trajectory,
                x0_limit=self.x0_limit(),
            )
        if self.cls == "LCMScheduler":
            return lcm_sample(
                model_fn,
                x,
                timesteps,
                abar,
                noises,
                self.prediction_type,
                float(self.timestep_scaling),
                return_trajectory,
                x0_limit=self.x0_limit(),
            )
        return tcd_sample(model_fn, x, timesteps, abar, eta, noises, self.prediction_type, return_trajectory)


def scheduler_class(name: str) -> str:
    """The diffusers class name of ``name`` (a class name or ``ddim`` / ``ddpm`` / ``lcm`` / ``tcd`` /
    ``flow_match``)."""
    cls = _ALIASES.get(str(name).lower(), name)
    if cls not in DEFAULTS:
        raise UserError(
            f"unknown scheduler {name!r}; expected one of {SCHEDULER_CLASSES} (or {tuple(_ALIASES)})"
        )
    return cls


def read_scheduler_config(
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    cls: str | None = None,
    *,
    ignored: Collection[str] = (),
    what: str | None = None,
) -> SchedulerConfig | FlowMatchConfig:
    """A :class:`SchedulerConfig` (a :class:`FlowMatchConfig` for ``FlowMatchEulerDiscreteScheduler``)
    from a diffusers scheduler config (a dict or a json file).

    cls: the class to build (a class name or ``ddim`` / ``ddpm`` / ``lcm`` / ``tcd`` / ``flow_match``);
      default the config's ``_class_name``. Building another class than the one that wrote the
      config is diffusers' ``Target.from_config(source.config)``.
    ignored: further keys to drop (for a config written by another diffusers class).
    """
    from fewstep_jax.models.hf_config import read_options  # the project's one config.json reader

    if isinstance(config, (str, os.PathLike)):
        what = what or os.fspath(config)
        with open(config) as f:
            config = json.load(f)
    config = dict(config or {})
    # an in-memory diffusers config lists the options its class left at their defaults: like
    # from_config, the class built here takes its own defaults for those
    for key in config.pop("_use_default_values", None) or ():
        config.pop(key, None)
    source = config.get("_class_name")
    if cls is None and source is None:
        raise UserError(f"{what or 'scheduler config'}: no _class_name; say which scheduler class to build")
    cls = scheduler_class(cls if cls is not None else source)
    drop = set(ignored)
    if source in DEFAULTS and source != cls:
        drop |= set(DEFAULTS[source]) - set(DEFAULTS[cls])
    opts = read_options(config, DEFAULTS[cls], what=what or f"scheduler config ({cls})", ignored=drop)
    if cls == FLOW_MATCH:
        return FlowMatchConfig(**opts)
    if opts["trained_betas"] is not None:
        opts["trained_betas"] = tuple(float(b) for b in opts["trained_betas"])
    return SchedulerConfig(cls=cls, **opts)


def scheduler_config(cls: str, **options) -> SchedulerConfig | FlowMatchConfig:
    """``<cls>(**options)`` with diffusers' defaults for the rest (unknown options are errors)."""
    cls = scheduler_class(cls)
    return read_scheduler_config({"_class_name": cls, **options}, cls)


__all__ = [
    "BETA_CLASSES",
    "DEFAULTS",
    "DEFAULT_ETA",
    "SCHEDULER_CLASSES",
    "SchedulerConfig",
    "read_scheduler_config",
    "scheduler_class",
    "scheduler_config",
]
