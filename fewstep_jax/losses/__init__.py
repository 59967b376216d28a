"""Loss terms: pure functions ``loss(params, inputs, batch, rng) -> (scalar, metrics)``.

One package per family, one file per method (docs/layout.md): ``flow_matching`` (teacher
training: ``flow_matching``, ``diffusion``), ``trajectory/`` (TraFlow, CTM, CD, reflow, shortcut,
mean flow), ``consistency/`` (TCD, LCM), ``distribution_matching/`` (TDM, DMD). Shared rooms:
``api`` (the term contract and the registry), ``options`` (the one config reader), ``distances``.
A method is a config that names terms and weights.

This is the registry's import list: importing any module of the package runs this file first,
which imports every family and so registers every term before ``api.get_factory`` is called.
"""

from fewstep_jax.losses import consistency, distribution_matching, flow_matching, trajectory

__all__ = ["consistency", "distribution_matching", "flow_matching", "trajectory"]
