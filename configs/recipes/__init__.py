"""Distillation recipes: ``RECIPES[name](config)`` turns a testbed config into a method's run.

One file per loss family holds its recipes (trajectory, tcd, distribution_matching); the
testbed-dependent sizes (network, batch, budget) live in ``testbeds.py``. ``configs/distill.py``
and the benchmarks build every run from these, so a method is written down exactly once.
"""

import importlib

RECIPES: dict = {}
for _family in ("trajectory", "tcd", "distribution_matching"):
    try:
        RECIPES.update(importlib.import_module(f"configs.recipes.{_family}").RECIPES)
    except ModuleNotFoundError as e:  # a family whose recipes have not landed yet
        if e.name != f"configs.recipes.{_family}":
            raise


def apply_recipe(config, name: str):
    """Applies recipe ``name`` to ``config`` in place; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown distillation recipe {name!r}; known: {sorted(RECIPES)}")
    config.method = name
    RECIPES[name](config)
    return config
