"""LoRA students of a loaded pipeline's denoiser (pipelines/folder.py), and their exports.

    pipe = load_pipeline(folder, scheduler="tcd")
    spec = read_lora_spec({"rank": 8, "alpha": 8})
    adapters = init_pipeline_adapters(pipe, spec, jax.random.PRNGKey(0))
    student = lora_student(pipe, spec, path, form="semilinear", prediction="eps")
    # train: state.params = adapters, the teacher = pipeline_teacher(pipe, ...) (its params are the base)
    save_pipeline_lora(out, pipe, adapters, spec)               # pipe.load_lora_weights(out)
    export_merged_pipeline(out2, pipe, adapters, spec)          # DiffusionPipeline.from_pretrained(out2)

The student's params are the adapters; its ``apply`` takes them joined with the base
(``WithBase``, joined by the train step from the teacher's params), so the base is never copied.
The denoiser's LoRA file prefix is diffusers' component name ("unet" / "transformer").
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax

from fewstep_jax.errors import UserError, require
from fewstep_jax.lora.adapters import (
    LoraSpec,
    WithBase,
    combine,
    init_adapters,
    lora_module,
    merged,
    scaled,
)
from fewstep_jax.lora.files import LoraFile, load_lora, save_lora
from fewstep_jax.models.state_dict import abstract_param_shapes, params_to_torch
from fewstep_jax.paths import Path
from fewstep_jax.students import Student

Array = jax.Array


def _denoiser_kind(module: Any) -> tuple[Callable[[Any], dict], Collection[str]]:
    """(example_inputs, torch list names) of a pipeline denoiser module."""
    from fewstep_jax.models import flux, pixart, sd3, unet_condition

    kinds = {
        unet_condition.UNet2DCondition: (unet_condition.example_inputs, unet_condition.UNET_COND_LIST_NAMES),
        pixart.PixArtTransformer2D: (pixart.example_inputs, pixart.PIXART_LIST_NAMES),
        sd3.SD3Transformer2D: (sd3.example_inputs, sd3.SD3_LIST_NAMES),
        flux.FluxTransformer2D: (flux.example_inputs, flux.FLUX_LIST_NAMES),
    }
    for cls, kind in kinds.items():
        if isinstance(module, cls):
            return kind
    raise UserError(f"no LoRA support for a denoiser of type {type(module).__name__}")


def _with_denoiser(pipe: Any, module: Any, params: Any) -> Any:
    from fewstep_jax.pipelines.folder import Component

    return dataclasses.replace(pipe, models={**pipe.models, pipe.spec.denoiser: Component(module, params)})


def init_pipeline_adapters(pipe: Any, spec: LoraSpec, key: Array) -> Any:
    """Fresh float32 adapters for the pipeline's denoiser (see ``adapters.init_adapters``)."""
    module = pipe.denoiser.module
    example_inputs, _ = _denoiser_kind(module)
    return init_adapters(
        module, spec, example_inputs(module), key, what=f"{pipe.spec.denoiser} of {pipe.folder}"
    )


def lora_pipeline(pipe: Any, specs: LoraSpec | Sequence[LoraSpec]) -> Any:
    """The pipeline with its denoiser wrapped by qwix's LoRA (``pipe.denoiser.params`` stays the
    base): ``denoiser_apply`` of it takes ``combine(base, adapters)``."""
    specs = (specs,) if isinstance(specs, LoraSpec) else tuple(specs)
    return _with_denoiser(pipe, lora_module(pipe.denoiser.module, specs), pipe.denoiser.params)


def with_adapters(
    pipe: Any, adapters: Any, specs: LoraSpec | Sequence[LoraSpec], scale: float = 1.0, *, merge: bool = False
) -> Any:
    """The pipeline sampling base + ``scale`` x adapters (diffusers' ``set_adapters([name],
    [scale])``): applied beside the base by the wrapped module (as training runs them), or with
    ``merge`` folded into the denoiser's params (as ``fuse_lora()``). Call it again on a merged
    result to stack another LoRA."""
    if merge:
        return _with_denoiser(
            pipe, pipe.denoiser.module, merged(pipe.denoiser.params, adapters, specs, scale)
        )
    wrapped = lora_pipeline(pipe, specs)
    return _with_denoiser(
        wrapped, wrapped.denoiser.module, combine(pipe.denoiser.params, scaled(adapters, scale))
    )


def lora_student(
    pipe: Any,
    specs: LoraSpec | Sequence[LoraSpec],
    path: Path,
    *,
    form: str = "semilinear",
    prediction: str = "eps",
    num_train_timesteps: int = 1000,
) -> Student:
    """A LoRA :class:`Student` of the pipeline's denoiser: params are adapters (``shares_base``),
    the network is the teacher's own at diffusers' timesteps (``latent_student_apply``): no ``s``
    input, so it is a LoRA diffusers loads (docs/guides/lora.md says which recipes train so)."""
    from fewstep_jax.pipelines.denoiser import latent_student_apply
    from fewstep_jax.pipelines.folder import denoiser_apply

    denoise = denoiser_apply(lora_pipeline(pipe, specs))

    def on_base(p: WithBase, x: Array, timestep: Array, cond: Any) -> Array:
        return denoise(p.full(), x, timestep, cond)

    apply = latent_student_apply(on_base, path, num_train_timesteps)
    return Student(apply, path, form=form, prediction=prediction, uses_s=False, shares_base=True)


def save_pipeline_lora(
    folder: str, pipe: Any, adapters: Any, specs: LoraSpec | Sequence[LoraSpec], **kwargs: Any
) -> str:
    """Write the denoiser's adapters as ``folder/pytorch_lora_weights.safetensors`` (kwargs:
    ``files.lora_state_dict``'s layout / fold_alpha / dtype). Returns the file."""
    _, list_names = _denoiser_kind(pipe.denoiser.module)
    return save_lora(folder, adapters, specs, list_names, prefix=pipe.spec.denoiser, **kwargs)


def load_pipeline_lora(path: str, pipe: Any) -> LoraFile:
    """A LoRA file (peft or kohya layout) for the pipeline's denoiser, checked against its layers."""
    module = pipe.denoiser.module
    example_inputs, list_names = _denoiser_kind(module)
    shapes = abstract_param_shapes(lambda: module.init(jax.random.PRNGKey(0), **example_inputs(module)))
    found = load_lora(path, shapes, list_names)
    if found.prefix not in ("", pipe.spec.denoiser) and found.layout == "peft":
        raise UserError(
            f"{path} is a LoRA of a {found.prefix!r}, this pipeline's denoiser is {pipe.spec.denoiser!r}"
        )
    return found


def export_merged_pipeline(
    out: str, pipe: Any, adapters: Any, specs: LoraSpec | Sequence[LoraSpec], scale: float = 1.0
) -> str:
    """A full pipeline folder with the adapters merged into the denoiser (for users who do not
    want adapters): the teacher folder's other components copied as they are, the denoiser's
    config.json copied and its weights written as ``diffusion_pytorch_model.safetensors`` (float32).
    ``out`` must not exist (nothing already saved is overwritten). Returns ``out``."""
    save_file = require("safetensors.numpy", "writing the merged pipeline").save_file
    if os.path.exists(out):
        raise UserError(f"{out!r} exists: the merged pipeline is written to a new folder")
    _, list_names = _denoiser_kind(pipe.denoiser.module)
    name = pipe.spec.denoiser
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = lambda d, files: [
        f for f in files if d.endswith(os.sep + name) and f.endswith((".safetensors", ".json"))
    ]
    shutil.copytree(pipe.folder, tmp, ignore=weights)
    shutil.copy(os.path.join(pipe.folder, name, "config.json"), os.path.join(tmp, name, "config.json"))
    state = params_to_torch(merged(pipe.denoiser.params, adapters, specs, scale), list_names)
    save_file(
        state, os.path.join(tmp, name, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"}
    )
    os.replace(tmp, out)
    return out


__all__ = [
    "export_merged_pipeline",
    "init_pipeline_adapters",
    "load_pipeline_lora",
    "lora_pipeline",
    "lora_student",
    "save_pipeline_lora",
    "with_adapters",
]
