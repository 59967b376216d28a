"""Trajectory family: TraFlow and the baselines built from its parts (docs/methods.md §2.3, §5).

One file per method: :mod:`.traflow` (``traflow`` and the single-part terms ``traflow_rec``,
``traflow_vel``, ``traflow_con``, ``straightness``), :mod:`.ctm` (``ctm``, a configuration of the
TraFlow core), :mod:`.cd` (``cd``), :mod:`.reflow` (``reflow``, ``reflow_distill``),
:mod:`.shortcut` (``shortcut``), :mod:`.meanflow` (``meanflow``); shared: :mod:`.grid` (time
grids, jump sampling, teacher jumps) and :mod:`.common` (options, data, target params). Importing
this package registers every term; the names below are the family's public pieces.
"""

from fewstep_jax.losses.trajectory import cd, ctm, meanflow, reflow, shortcut, traflow
from fewstep_jax.losses.trajectory.grid import (
    GridTimes,
    jump_times,
    sample_grid_times,
    solve_per_sample,
    teacher_jump,
    time_grid,
)
from fewstep_jax.losses.trajectory.meanflow import meanflow_target
from fewstep_jax.losses.trajectory.shortcut import shortcut_target

__all__ = [
    "GridTimes",
    "cd",
    "ctm",
    "jump_times",
    "meanflow",
    "meanflow_target",
    "reflow",
    "sample_grid_times",
    "shortcut",
    "shortcut_target",
    "solve_per_sample",
    "teacher_jump",
    "time_grid",
    "traflow",
]
