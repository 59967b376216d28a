"""A latent pipeline's denoiser (UNet or transformer) in the project's time: the text-conditioned
:class:`~fewstep_jax.teachers.Teacher` and the :class:`~fewstep_jax.students.Student` network.

A family's denoiser is one pure function in diffusers' units,
``denoise(params, latents (B, h, w, C) NHWC, timestep (B,), cond) -> model output (B, h, w, C)``,
with ``cond`` the conditioning pytree of the pipeline's prompt encoder (e.g. ``{"text_states":
(B, L, D), "text_mask": (B, L)}``; a student's guidance input arrives as ``cond["guidance"]`` (B,)).
This module puts it on the project's continuous time ``t`` in [0, 1]:

* the scheduler config decides the path and prediction kind (docs/concepts.md "paths"): a beta
  table (DDPM, DDIM, LCM, TCD, ... configs) is the :class:`~fewstep_jax.paths.DDPM` path with
  ``prediction_type`` epsilon -> ``eps``, v_prediction -> ``v``, sample -> ``x0``; a flow-match
  config is :class:`~fewstep_jax.paths.RectifiedFlow` with a velocity (``flow``) output;
* ``t`` becomes diffusers' timestep: ``k = t T - 1`` on the DDPM path (so the integer timesteps
  sit exactly on the grid), ``sigma T`` with ``sigma = t`` on the flow-match path.

Every loss then runs on the latent teacher unchanged in its mathematics: it passes ``batch["label"]``
(here the conditioning pytree) to the teacher and the student as it passes class labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fewstep_jax.errors import UserError
from fewstep_jax.paths import DDPM, Path, RectifiedFlow
from fewstep_jax.schedules.flow_match_scheduler import FlowMatchConfig
from fewstep_jax.schedules.scheduler_config import SchedulerConfig
from fewstep_jax.teachers.base import Teacher

Array = jax.Array
Denoise = Callable[[Any, Array, Array, Any], Array]
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def path_of_scheduler(scfg: SchedulerConfig | FlowMatchConfig) -> tuple[Path, str]:
    """``(path, prediction kind)`` of a scheduler config read by ``read_scheduler_config``."""
    if isinstance(scfg, FlowMatchConfig):
        return RectifiedFlow(), "flow"
    if scfg.trained_betas is not None or scfg.rescale_betas_zero_snr:
        raise UserError(
            f"{scfg.cls} config: trained_betas / rescale_betas_zero_snr have no continuous path here "
            "(the DDPM path takes the linear and scaled_linear tables)"
        )
    if scfg.beta_schedule not in ("linear", "scaled_linear"):
        raise UserError(
            f"{scfg.cls} config: beta_schedule {scfg.beta_schedule!r} has no continuous path here "
            "(linear, scaled_linear)"
        )
    path = DDPM(
        schedule=scfg.beta_schedule,
        beta_start=float(scfg.beta_start),
        beta_end=float(scfg.beta_end),
        num_train_timesteps=int(scfg.num_train_timesteps),
    )
    return path, PREDICTIONS[scfg.prediction_type]


def diffusers_timestep(path: Path, t: Array, num_train_timesteps: int = 1000) -> Array:
    """The project's time ``t`` (B,) -> diffusers' timestep (B,) float32 for the denoiser."""
    t = jnp.asarray(t, jnp.float32)
    if isinstance(path, DDPM):
        return path.t_to_timestep(t)
    if isinstance(path, RectifiedFlow):
        return t * num_train_timesteps
    raise ValueError(f"a latent denoiser runs on the DDPM or rectified-flow path, not {path.name!r}")


def latent_teacher(
    denoise: Denoise,
    params: Any,
    path: Path,
    prediction: str,
    latent_shape: tuple[int, ...],
    null_condition: Any,
    name: str = "latent teacher",
    num_train_timesteps: int = 1000,
) -> Teacher:
    """The frozen text-conditioned teacher of a denoiser.

    latent_shape: one latent (h, w, C); null_condition: the conditioning pytree of the empty or
    negative prompt (leaves (1, ...) or (B, ...)), which guidance and an absent condition use.
    """

    def apply(p, x, t, cond):
        return denoise(p, x, diffusers_timestep(path, t, num_train_timesteps), cond)

    return Teacher(
        params=params,
        apply=apply,
        path=path,
        prediction=prediction,
        data_shape=tuple(latent_shape),
        name=name,
        null_condition=null_condition,
    )


def pipeline_teacher(
    pipe: Any, null_condition: Any, latent_size: tuple[int, int], scheduler: Any = None
) -> Teacher:
    """The latent teacher of a loaded pipeline (``pipelines.folder.load_pipeline``): its denoiser
    call and params, the path and prediction kind of its scheduler (or ``scheduler``: a class name
    such as "ddim" or a mirror object, see ``pipelines.sampling.resolve_scheduler``).

    null_condition: the empty / negative prompt's conditioning (``encode_prompts``' second
    output); latent_size: (h, w) of one latent (the image size over ``pipe.vae_scale_factor``).
    """
    from fewstep_jax.pipelines.folder import denoiser_apply
    from fewstep_jax.pipelines.sampling import resolve_scheduler

    sched = resolve_scheduler(pipe, scheduler)
    path, prediction = path_of_scheduler(sched)
    shape = (*latent_size, pipe.latent_channels)
    return latent_teacher(
        denoiser_apply(pipe),
        pipe.denoiser.params,
        path,
        prediction,
        shape,
        null_condition,
        name=pipe.pipeline_class,
        num_train_timesteps=sched.num_train_timesteps,
    )


def latent_student_apply(denoise: Denoise, path: Path, num_train_timesteps: int = 1000) -> Callable:
    """The :class:`~fewstep_jax.students.Student` ``apply`` of a denoiser (a full fine-tune or a
    LoRA of the teacher's network): no ``s`` or ``num_steps`` input; a guidance input (B,) is
    passed on as ``cond["guidance"]`` for networks with a guidance embedding."""

    def apply(params, x, t, s, label, guidance, num_steps, rngs, train):
        del s, num_steps, rngs, train  # the diffusers networks take none of these
        cond = label if guidance is None else {**label, "guidance": guidance}
        return denoise(params, x, diffusers_timestep(path, t, num_train_timesteps), cond)

    return apply


__all__ = [
    "PREDICTIONS",
    "diffusers_timestep",
    "latent_student_apply",
    "latent_teacher",
    "path_of_scheduler",
    "pipeline_teacher",
]
