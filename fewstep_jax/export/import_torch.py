"""Import a diffusers `UNet2DModel` (PyTorch) as Flax params of our UNet2D and as a Teacher.

Sources: a folder written by `UNet2DModel.save_pretrained` (config.json +
diffusion_pytorch_model.safetensors, or a legacy .bin read with torch.load(weights_only=True)),
or a single .safetensors / .bin file plus its config (dict or config.json path).
Nothing is ever unpickled beyond torch's weights-only loader.

Time: the diffusers network takes the DDPM timestep k, our DDPM path puts k at t = (k + 1) / T.
The imported model config has time_scale = T and the teacher feeds the network
t + time_offset / T with time_offset = -1, so the network sees exactly k = t T - 1.
Class labels: a diffusers table of `num_class_embeds` rows becomes num_classes =
num_class_embeds - 1 with the last row the null class (label -1), our own convention.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from fewstep_jax.errors import require
from fewstep_jax.export.convert import DIFFUSERS_WEIGHTS_NAME, from_state_dict
from fewstep_jax.models import build_model, unet_config
from fewstep_jax.paths import DDPM
from fewstep_jax.teachers.base import Teacher

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# UNet2DModel options our UNet2D implements only at these values.
_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
}
_LEGACY_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class ImportedUNet:
    """model_cfg: our UNet2D config; params: Flax params; teacher: the Teacher;
    time_offset: network time = t * time_scale + time_offset (for export meta)."""

    model_cfg: ml_collections.ConfigDict
    params: Any
    teacher: Teacher
    time_offset: float


def load_state_file(path: str) -> dict[str, np.ndarray]:
    """{key: float32 numpy array} of a .safetensors file, or of a .bin/.pt/.pth read weights-only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} not found")
    if not path.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise ValueError(f"unsupported weights file {path!r}: expected .safetensors (or .bin/.pt/.pth)")
    torch = require("torch", "importing PyTorch weights")  # bfloat16 files need torch's dtypes
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path!r} cannot be read with torch.load(weights_only=True) and will not be "
                f"unpickled; convert it to safetensors ({err})"
            ) from err
        if not isinstance(state, dict):
            raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def unet_config_from_diffusers(dcfg: dict[str, Any]) -> ml_collections.ConfigDict:
    """Our UNet2D config of a UNet2DModel config dict; ValueError naming an unsupported field."""
    cls = dcfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"unknown architecture {cls!r}: only diffusers' UNet2DModel can be imported")
    for key, value in _FIXED.items():
        if key in dcfg and dcfg[key] != value:
            raise ValueError(
                f"UNet2DModel config field {key}={dcfg[key]!r} is not supported (only {value!r})"
            )
    size = dcfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"UNet2DModel config field sample_size={size!r}: only square sizes")
        size = size[0]
    if size is None:
        raise ValueError("UNet2DModel config field sample_size is missing")
    chans = tuple(int(c) for c in dcfg.get("block_out_channels", (224, 448, 672, 896)))
    down_default = ("DownBlock2D",) + ("AttnDownBlock2D",) * 3  # UNet2DModel's defaults
    up_default = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)
    head = dcfg.get("attention_head_dim", 8)
    if head is None:
        head = chans[-1]  # diffusers then uses one head over the block's channels
    n_cls = dcfg.get("num_class_embeds")
    cfg = unet_config("digits")
    cfg.update(
        sample_size=int(size),
        in_channels=int(dcfg.get("in_channels", 3)),
        out_channels=int(dcfg.get("out_channels", 3)),
        block_out_channels=chans,
        down_block_types=tuple(dcfg.get("down_block_types", down_default)),
        up_block_types=tuple(dcfg.get("up_block_types", up_default)),
        layers_per_block=int(dcfg.get("layers_per_block", 2)),
        attention_head_dim=int(head),
        norm_num_groups=int(dcfg.get("norm_num_groups", 32)),
        norm_eps=float(dcfg.get("norm_eps", 1e-5)),
        dropout=float(dcfg.get("dropout", 0.0)),
        num_classes=int(n_cls) - 1 if n_cls else 0,
        time_scale=float(dcfg.get("num_train_timesteps") or 1000),
    )
    build_model(cfg)  # validates (names the field on error)
    return cfg


def ddpm_path_from_scheduler(scfg: dict[str, Any]) -> DDPM:
    """The DDPM path of a diffusers scheduler config (DDPMScheduler defaults when absent)."""
    schedule = scfg.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear"):
        raise ValueError(f"scheduler beta_schedule {schedule!r} is not supported (linear, scaled_linear)")
    if scfg.get("trained_betas") is not None:
        raise ValueError("scheduler config field trained_betas is not supported")
    return DDPM(
        schedule=schedule,
        beta_start=float(scfg.get("beta_start", 0.0001)),
        beta_end=float(scfg.get("beta_end", 0.02)),
        num_train_timesteps=int(scfg.get("num_train_timesteps", 1000)),
    )


def import_diffusers_unet(
    source: str,
    *,
    config: dict[str, Any] | str | None = None,
    scheduler_config: dict[str, Any] | str | None = None,
    prediction: str | None = None,
    name: str = "imported",
) -> ImportedUNet:
    """A diffusers UNet2DModel (folder or weights file) -> our config, Flax params and Teacher.

    config: the UNet2DModel config (dict or json path); default `<folder>/config.json`.
    scheduler_config: its scheduler's config (beta schedule, prediction_type); default
      `<folder>/scheduler_config.json`, then `<folder>/../scheduler/scheduler_config.json`, else
      DDPMScheduler's defaults (linear 1e-4..0.02, epsilon).
    prediction: "eps" | "v" | "x0", overrides the scheduler's prediction_type.
    """
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    if os.path.isdir(source):
        weights = os.path.join(source, DIFFUSERS_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            legacy = [p for n in _LEGACY_WEIGHTS if os.path.isfile(p := os.path.join(source, n))]
            if not legacy:
                raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS_NAME} (or {_LEGACY_WEIGHTS}) in {source!r}")
            weights = legacy[0]
    else:
        weights = source
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights!r} not found")
    dcfg = _read_json(config if config is not None else os.path.join(folder, "config.json"), "UNet config")
    scfg: dict[str, Any] = {}
    if scheduler_config is not None:
        scfg = _read_json(scheduler_config, "scheduler config")
    else:
        for cand in (
            os.path.join(folder, "scheduler_config.json"),
            os.path.join(folder, os.pardir, "scheduler", "scheduler_config.json"),
        ):
            if os.path.isfile(cand):
                scfg = _read_json(cand, "scheduler config")
                break

    model_cfg = unet_config_from_diffusers(dcfg)
    size, chans = model_cfg.sample_size, model_cfg.in_channels
    params = from_state_dict(load_state_file(weights), model_cfg, (size, size, chans))

    path = ddpm_path_from_scheduler(scfg)
    if int(model_cfg.time_scale) != path.num_train_timesteps:
        model_cfg.time_scale = float(path.num_train_timesteps)
    if prediction is None:
        ptype = scfg.get("prediction_type", "epsilon")
        if ptype not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {ptype!r} not in {sorted(PREDICTION_TYPES)}")
        prediction = PREDICTION_TYPES[ptype]
    elif prediction not in PREDICTION_TYPES.values():
        raise ValueError(f"prediction must be one of {sorted(PREDICTION_TYPES.values())}, got {prediction!r}")

    model = build_model(model_cfg)
    time_offset = -1.0
    shift = time_offset / model_cfg.time_scale
    use_labels = model_cfg.num_classes > 0

    def apply(p, x, t, label):
        kw = {"label": label} if use_labels else {}
        return model.apply({"params": p}, x, t + shift, **kw)

    teacher = Teacher(
        params=params,
        apply=apply,
        path=path,
        prediction=prediction,
        data_shape=(size, size, chans),
        num_classes=int(model_cfg.num_classes),
        name=name,
    )
    return ImportedUNet(model_cfg, params, teacher, time_offset)


def _read_json(src: dict[str, Any] | str, what: str) -> dict[str, Any]:
    if isinstance(src, dict):
        return dict(src)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{what} file {src!r} not found")
    with open(src) as f:
        return json.load(f)


__all__ = [
    "ImportedUNet",
    "ddpm_path_from_scheduler",
    "import_diffusers_unet",
    "load_state_file",
    "unet_config_from_diffusers",
]
