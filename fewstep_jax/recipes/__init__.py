"""Distillation recipes: ``RECIPES[name](config)`` turns a testbed config into a method's run.

One file per loss family holds its recipes (trajectory, tcd, distribution_matching); the
testbed-dependent sizes (network, batch, budget) live in ``testbeds.py``, the base config in
``base.py``. The experiment files of ``configs/``, the pipeline and the benchmarks build every run
from these, so a method is written down exactly once.
"""

from __future__ import annotations

import ml_collections

from fewstep_jax.errors import unknown
from fewstep_jax.recipes import base, distribution_matching, tcd, trajectory
from fewstep_jax.recipes.testbeds import apply_testbed

RECIPES: dict = {**trajectory.RECIPES, **tcd.RECIPES, **distribution_matching.RECIPES}


def apply_recipe(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Applies recipe ``name`` to ``config`` in place; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise unknown("distillation recipe", name, RECIPES)
    config.method = name
    RECIPES[name](config)
    return config


def distill_config(testbed: str, recipe: str, steps: int | None = None) -> ml_collections.ConfigDict:
    """The base config with testbed ``testbed``'s network, batch and budget (``steps`` student
    steps instead of the testbed's when given) and recipe ``recipe`` applied."""
    c = base.get_config()
    apply_testbed(c, testbed, steps)
    apply_recipe(c, recipe)
    return c


__all__ = ["RECIPES", "apply_recipe", "distill_config"]
