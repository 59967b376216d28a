"""Input pipelines: stateless per-step numpy batch sources and dataset loaders."""

from fewstep_jax.data.builtin import (
    KNOWN_DATASETS,
    load_dataset,
    load_digits,
    load_mnist,
    uint8_to_unit,
)
from fewstep_jax.data.sources import (
    ArraySource,
    ArraySpec,
    Batch,
    BatchSource,
    NoiseSource,
    SamplerSource,
    local_batch_size,
    spec_of,
)
from fewstep_jax.data.tfds_source import load_tfds_arrays

__all__ = [
    "KNOWN_DATASETS",
    "ArraySource",
    "ArraySpec",
    "Batch",
    "BatchSource",
    "NoiseSource",
    "SamplerSource",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_tfds_arrays",
    "local_batch_size",
    "spec_of",
    "uint8_to_unit",
]
