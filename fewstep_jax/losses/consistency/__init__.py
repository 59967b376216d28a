"""DDIM-jump consistency family: TCD and LCM (docs/methods.md §3, §5.3).

Both distil one skipping step of the teacher's DDIM solver on a DDPM timestep grid
(:mod:`.ddim_jump`, shared); one file per method: :mod:`.tcd` (``tcd``), :mod:`.lcm` (``lcm``).
CD and CTM, consistency models on a continuous time grid, are in :mod:`fewstep_jax.losses.trajectory`.
Importing this package registers every term; the names below are the family's public pieces.
"""

from fewstep_jax.losses.consistency import lcm, tcd
from fewstep_jax.losses.consistency.ddim_jump import skip_times
from fewstep_jax.losses.consistency.lcm import LCM_DEFAULTS, lcm_scalings
from fewstep_jax.losses.consistency.tcd import TCD_DEFAULTS, tcf

__all__ = ["LCM_DEFAULTS", "TCD_DEFAULTS", "lcm", "lcm_scalings", "skip_times", "tcd", "tcf"]
