"""CTM without its GAN: a configuration of the TraFlow core (docs/methods.md §5.4).

CTM's soft-consistency loss is TraFlow's ``con`` part on the same grid time sample and teacher
jump, ``d(G_tgt(G(x_t, t, s), s, 0), sg G_tgt(sg G(x_r, r, s), s, 0))``, plus optionally the DSM
regression of the ``G(x, t, t)`` denoiser (``lam_dsm``); so ``ctm`` is the core of
:mod:`.traflow` with the reconstruction, velocity and straightness weights fixed at 0, and CTM's
jump sampler by default (``jump_sampler="ctm"``: one ``k ∝ k`` per batch, then the start among
those that fit, as ``sony/ctm``; :func:`.grid.sample_grid_times`).
"""

from __future__ import annotations

from fewstep_jax.losses.api import register
from fewstep_jax.losses.trajectory.traflow import traflow_factory

CTM_FIXED = {"lam_rec": 0.0, "lam_vel": 0.0, "lam_straight": 0.0, "lam_con": 1.0, "vel_variant": "A"}

CTM_DEFAULTS = {"jump_sampler": "ctm"}

ctm = register("ctm")(traflow_factory("ctm", CTM_FIXED, CTM_DEFAULTS))

__all__ = ["CTM_DEFAULTS", "CTM_FIXED", "ctm"]
