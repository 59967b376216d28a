"""Flow-map students ``G(x, t, s) ~ Phi(x, t, s)`` with ``G(x, t, t) = x`` exact by construction.

A :class:`Student` wraps a network ``apply(params, x, t, s, label, guidance, num_steps)`` whose
output is a prediction of kind ``prediction`` on ``path`` (docs/methods.md §1.2, docs/design.md "Student"):

* ``form="euler"`` (TraFlow, CTM, shortcut, mean-flow; CD with ``s = 0``):
  ``G = x + (s - t) u`` with ``u`` the network's output read as a velocity. When the network
  takes ``s`` (``uses_s``), ``u`` is the average velocity over [s, t]; a student initialised from
  a teacher (zero-initialised s-branch) starts as one teacher Euler step.
* ``form="semilinear"`` (TCD's TCF(1), CTM's data-space form, DDIM / exponential integrator):
  ``G = alpha_s x0 + sigma_s eps`` with ``(x0, eps)`` the network's prediction at ``(x, t)``
  (optionally s-conditioned). On the rectified-flow path the two forms coincide.

The student is a pytree with no leaves (all static), so it can be passed to jitted functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fewstep_jax.paths import Path, bcast

Array = jax.Array
FORMS = ("euler", "semilinear")


@flax.struct.dataclass
class Student:
    """A flow-map student.

    Attributes:
      apply: ``(params, x, t, s, label, guidance, num_steps, rngs, train) -> (B, ...)`` network.
      path: the interpolation path (the teacher's).
      form: ``"euler"`` or ``"semilinear"``.
      prediction: kind of the network output (``flow``, ``x0``, ``eps``, ``v``).
      uses_s: whether the network takes the target time ``s`` as an input.
      shares_base: a LoRA network (fewstep_jax/lora): its params are adapters only, and ``apply``
        takes them joined with the frozen base, the teacher's params
        (``lora.adapters.WithBase``); :func:`with_base` joins them where the network is called.
    """

    apply: Callable = flax.struct.field(pytree_node=False)
    path: Path = flax.struct.field(pytree_node=False)
    form: str = flax.struct.field(pytree_node=False, default="euler")
    prediction: str = flax.struct.field(pytree_node=False, default="flow")
    uses_s: bool = flax.struct.field(pytree_node=False, default=True)
    shares_base: bool = flax.struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"unknown student form {self.form!r}; expected one of {FORMS}")

    def network(self, params, x, t, s=None, label=None, guidance=None, num_steps=None, rng=None, train=False):
        """The raw network output, (B, ...)."""
        rngs = {"dropout": rng} if rng is not None else None
        return self.apply(params, x, t, s if self.uses_s else None, label, guidance, num_steps, rngs, train)

    def x0_eps(self, params, x, t, s=None, **kw) -> tuple[Array, Array]:
        """``(x0, eps)`` implied by the network's prediction at ``(x, t)``."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return self.path.to_x0_eps(self.network(params, x, t, s, **kw), self.prediction, x, t)

    def velocity(self, params, x, t, s=None, **kw) -> Array:
        """The network's output read as a velocity (average over [s, t] when s-conditioned)."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return self.path.convert(self.network(params, x, t, s, **kw), self.prediction, "flow", x, t)

    def __call__(self, params, x, t, s, **kw) -> Array:
        """``G(x, t, s)``: x (B, ...), t and s scalars or (B,); returns (B, ...)."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
        if self.form == "euler":
            return x + bcast(s - t, x) * self.velocity(params, x, t, s, **kw)
        x0, eps = self.x0_eps(params, x, t, s, **kw)
        a_s, s_s = self.path.alpha_sigma(s)
        # exact identity at s == t (h = 0): alpha_t x0 + sigma_t eps == x
        return jnp.where(bcast(s == t, x), x, bcast(a_s, x) * x0 + bcast(s_s, x) * eps)


def with_base(net: Student, params: Any, teacher: Any) -> Any:
    """The params ``net.apply`` takes: a LoRA network's adapters joined with the teacher's params
    (the same arrays, never a copy; no gradient flows into them), any other network's as given."""
    if not net.shares_base:
        return params
    from fewstep_jax.lora.adapters import WithBase

    return WithBase(params, jax.lax.stop_gradient(teacher.params))


def model_apply(model) -> Callable:
    """Adapts a Flax model of fewstep_jax.models to the :class:`Student` ``apply`` signature."""

    def apply(params, x, t, s, label, guidance, num_steps, rngs, train):
        return model.apply(
            {"params": params},
            x,
            t,
            s=s,
            label=label,
            guidance=guidance,
            num_steps=num_steps,
            train=train,
            rngs=rngs,
        )

    return apply


__all__ = ["FORMS", "Student", "model_apply", "with_base"]
