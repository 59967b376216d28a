"""Export to PyTorch (safetensors + config.json + self-contained torch mirrors) and import of
diffusers UNet2DModel teachers. `torch_models` / `torch_sampler` import torch only (no JAX)."""

from fewstep_jax.export.convert import (
    check_params,
    export_params,
    from_state_dict,
    is_diffusers_compatible,
    to_state_dict,
)
from fewstep_jax.export.import_torch import ImportedUNet, import_diffusers_unet, load_state_file

__all__ = [
    "ImportedUNet",
    "check_params",
    "export_params",
    "from_state_dict",
    "import_diffusers_unet",
    "is_diffusers_compatible",
    "load_state_file",
    "to_state_dict",
]
