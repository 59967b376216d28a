"""Distill a student on a testbed with a named recipe (configs/recipes):

python -m fewstep_jax.main --config=configs/distill.py:gmm8,traflow --workdir=runs/gmm8_traflow

The argument is ``<testbed>,<recipe>[,<steps>]``; every field can still be overridden on the
command line (``--config.train.num_steps=500``).
"""

from configs import base
from configs.recipes import apply_recipe
from configs.recipes.testbeds import apply_testbed


def get_config(arg: str = "gmm8,traflow"):
    parts = arg.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/distill.py takes '<testbed>,<recipe>[,<steps>]', got {arg!r}")
    c = base.get_config()
    apply_testbed(c, parts[0], int(parts[2]) if len(parts) == 3 else None)
    apply_recipe(c, parts[1])
    return c
