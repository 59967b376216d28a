"""Testbeds: exact testbeds (an analytic teacher whose flow map is known, :mod:`.exact`) and
dataset testbeds (a TFDS image dataset, no analytic teacher, :mod:`.dataset`), one interface
(:class:`~fewstep_jax.testbeds.base.Testbed`), built from a config by
:func:`make_testbed_from_config`; :func:`teacher_data_source` serves either's training data."""

from __future__ import annotations

import jax
import ml_collections

from fewstep_jax.data import BatchSource
from fewstep_jax.errors import UserError, did_you_mean
from fewstep_jax.testbeds.base import Testbed


def make_testbed_from_config(config: ml_collections.ConfigDict) -> Testbed:
    """The testbed of ``config.testbed``: an :class:`~fewstep_jax.testbeds.exact.ExactTestbed` or a
    :class:`~fewstep_jax.testbeds.dataset.DatasetTestbed` for ``tfds:<name>``."""
    from fewstep_jax.testbeds.dataset import is_dataset_name, make_dataset_testbed
    from fewstep_jax.testbeds.exact import TESTBEDS, make_testbed

    tb = config.testbed
    if is_dataset_name(tb.name):
        return make_dataset_testbed(config)
    if tb.name not in TESTBEDS:
        raise UserError(
            f"unknown testbed.name={tb.name!r}{did_you_mean(tb.name, TESTBEDS)}; expected an exact testbed "
            f"{TESTBEDS} or a TFDS image dataset 'tfds:<name>' (e.g. 'tfds:cifar10', with testbed.data_dir "
            "and testbed.split)"
        )
    return make_testbed(
        tb.name,
        tb.path,
        num_reference=int(tb.num_reference),
        seed=int(config.seed),
        mnist_path=tb.mnist_path or None,
        subset=int(tb.subset),
    )


def teacher_data_source(config: ml_collections.ConfigDict, testbed: Testbed) -> BatchSource:
    """This process's batches of the testbed's data; labels only for a conditional model."""
    conditional = int(config.model.get("num_classes", 0)) > 0
    args = (int(config.train.batch_size), int(config.seed), jax.process_index(), jax.process_count())
    return testbed.source(conditional, *args)


__all__ = ["Testbed", "make_testbed_from_config", "teacher_data_source"]
