"""Export to PyTorch (safetensors + fewstep.json + self-contained torch mirrors; writing needs no
torch) and import of diffusers UNet2DModel teachers. `torch_models` / `torch_sampler` import torch
only (no JAX); `check` compares an exported folder in PyTorch with the JAX network."""

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
