"""Distill a student on a testbed with a named recipe (fewstep_jax/recipes):

fewstep --config=configs/distill.py:gmm8,traflow --workdir=runs/gmm8_traflow

The argument is ``<testbed>,<recipe>[,<steps>]``; every field can still be overridden on the
command line (``--config.train.num_steps=500``).
"""

from fewstep_jax.recipes import distill_config


def get_config(arg: str = "gmm8,traflow"):
    parts = arg.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/distill.py takes '<testbed>,<recipe>[,<steps>]', got {arg!r}")
    return distill_config(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None)
