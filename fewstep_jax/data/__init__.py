"""Input pipelines: stateless per-step numpy batch sources and dataset loaders.

Imports flow one way: `sources` (batch sources) and `images` (uint8 -> [-1, 1] arrays) at the
bottom, then `random_access` (reads by index), `tfds_source` (TFDS splits; TensorFlow imported on
first use), and `builtin` (the named datasets and the `load_dataset` dispatch) on top.
"""

from fewstep_jax.data.builtin import KNOWN_DATASETS, load_dataset, load_digits, load_mnist
from fewstep_jax.data.images import Arrays, image_arrays, uint8_to_unit
from fewstep_jax.data.random_access import RandomAccess, RandomAccessSource, read_records
from fewstep_jax.data.sources import (
    ArraySource,
    ArraySpec,
    Batch,
    BatchSource,
    IndexedSource,
    NoiseSource,
    SamplerSource,
    local_batch_size,
    spec_of,
)
from fewstep_jax.data.tfds_source import TfdsImageInfo, load_tfds_arrays, tfds_data_source, tfds_image_info

__all__ = [
    "KNOWN_DATASETS",
    "ArraySource",
    "ArraySpec",
    "Arrays",
    "Batch",
    "BatchSource",
    "IndexedSource",
    "NoiseSource",
    "RandomAccess",
    "RandomAccessSource",
    "SamplerSource",
    "TfdsImageInfo",
    "image_arrays",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_tfds_arrays",
    "local_batch_size",
    "read_records",
    "spec_of",
    "tfds_data_source",
    "tfds_image_info",
    "uint8_to_unit",
]
