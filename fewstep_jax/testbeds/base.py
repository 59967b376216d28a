"""What every testbed gives a run: the interface of exact testbeds and dataset testbeds.

A testbed is where a run gets its training data and how its samples are scored. Two kinds share
this interface: an :class:`~fewstep_jax.testbeds.exact.ExactTestbed` has an analytic teacher
whose flow map is known (``exact_teacher``), so samplers are scored against that flow map; a
:class:`~fewstep_jax.testbeds.dataset.DatasetTestbed` (a real image dataset) has none
(``exact_teacher`` is None): runs on it need a network teacher and are scored by sample distances
alone. Code that must tell them apart asks ``has_exact_teacher``; everything else goes through the
members below.
"""

from __future__ import annotations

import abc

import ml_collections
import numpy as np

from fewstep_jax.data import BatchSource
from fewstep_jax.paths import Path
from fewstep_jax.teachers.base import Teacher


class Testbed(abc.ABC):
    """The interface of a testbed.

    Attributes (a field or a property of each implementation):
      name: the testbed's name (``config.testbed.name``).
      path: the probability path runs on it use (the teacher's).
    """

    name: str
    path: Path

    @property
    @abc.abstractmethod
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (D,) or (H, W, C)."""

    @property
    @abc.abstractmethod
    def is_image(self) -> bool:
        """Whether samples are (H, W, C) images (image grids, Frechet distances) rather than points."""

    @property
    @abc.abstractmethod
    def singular_at_data(self) -> bool:
        """Whether the teacher's velocity is singular at t = 0, so that solvers end with Euler."""

    @property
    @abc.abstractmethod
    def exact_teacher(self) -> Teacher | None:
        """The analytic teacher whose flow map scores samplers; None for a real dataset."""

    @property
    def has_exact_teacher(self) -> bool:
        """Whether samplers can be scored against an exact flow map (``exact_teacher``)."""
        return self.exact_teacher is not None

    @property
    @abc.abstractmethod
    def distance_names(self) -> tuple[str, ...]:
        """Keys of :meth:`distances`, in table order (empty when no distance is configured)."""

    @property
    @abc.abstractmethod
    def main_distance(self) -> str | None:
        """The distance the tables lead with (None when there is none)."""

    @abc.abstractmethod
    def distances(self, x: np.ndarray) -> dict[str, float]:
        """Sample distances of ``x`` (N, ...) to the testbed's data; lower is better."""

    @abc.abstractmethod
    def source(
        self, conditional: bool, batch_size: int, seed: int, process_index: int, process_count: int
    ) -> BatchSource:
        """This process's rows of the global training batches ``{"x", ["label"]}`` (labels only for a
        ``conditional`` model), a pure function of (seed, step)."""

    @abc.abstractmethod
    def check_model(self, model_cfg: ml_collections.ConfigDict) -> None:
        """A clear error (ValueError) when a network config cannot fit the testbed's data."""


__all__ = ["Testbed"]
