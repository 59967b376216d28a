"""The teacher interface shared by analytic, neural and imported teachers (docs/design.md "Teacher").

A :class:`Teacher` is a pytree: its ``params`` (frozen weights, or the arrays of an analytic
density) are the leaves, everything else is static. Passing a teacher to a jitted function
therefore passes its params as arguments: they are never baked into the compiled program, and a
train step can take the teacher as an argument without re-compiling when its weights change.

``apply(params, x, t, label) -> prediction`` is the one pure function a source provides, in the
teacher's own ``path`` and ``prediction`` kind; the rest (velocity, ``(x0, eps)``, guidance, ODE
solves) is derived here once for every source.

The condition ``label`` is either class labels (B,) int32 (``num_classes > 0``; -1 is the null
class) or, for a text-conditioned latent teacher, a conditioning pytree (a dict of arrays with a
leading batch axis, e.g. ``{"text_states": (B, L, D), "text_mask": (B, L)}``) beside the teacher's
``null_condition`` (the same dict for the empty / negative prompt, batch 1 or B) that classifier-free
guidance and an absent condition use. The losses pass either kind through unchanged
(docs/design.md "Teacher").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fewstep_jax import solvers
from fewstep_jax.paths import Path

Array = jax.Array
NULL_LABEL = -1


@flax.struct.dataclass
class Teacher:
    """A frozen teacher: ``apply(params, x, t, label)`` predicts ``prediction`` on ``path``.

    Attributes:
      params: pytree of frozen arrays (leaves of this pytree).
      apply: pure function ``(params, x (B, ...), t (B,), label (B,) int32 | None) -> (B, ...)``.
      path: the interpolation path the teacher was trained on.
      prediction: ``"flow" | "x0" | "eps" | "v" | "score"``.
      data_shape: shape of one sample, e.g. ``(2,)`` or ``(28, 28, 1)``.
      num_classes: number of class labels (0 = unconditional); label -1 is the null class.
      name: for reports.
      singular_at_zero: the velocity is singular at t = 0 on any path (the ideal denoiser of a
        finite set); with the path's own singularity this is :attr:`euler_into_data`.
      null_condition: None, or the conditioning pytree of the empty / negative prompt (leaves
        (1, ...) or (B, ...)): the teacher is then text-conditioned (see the module docstring).
    """

    params: Any
    apply: Callable = flax.struct.field(pytree_node=False)
    path: Path = flax.struct.field(pytree_node=False)
    prediction: str = flax.struct.field(pytree_node=False, default="flow")
    data_shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    num_classes: int = flax.struct.field(pytree_node=False, default=0)
    name: str = flax.struct.field(pytree_node=False, default="teacher")
    singular_at_zero: bool = flax.struct.field(pytree_node=False, default=False)
    null_condition: Any = None

    @property
    def conditional(self) -> bool:
        """Whether the teacher takes a condition (class labels or a conditioning pytree)."""
        return self.num_classes > 0 or self.null_condition is not None

    @property
    def euler_into_data(self) -> bool:
        """Whether solves of this teacher step into the data with Euler (docs/methods.md pitfall 23):
        :func:`fewstep_jax.solvers.singular_at_data` of its path and its own singularity."""
        return solvers.singular_at_data(self.path, self.singular_at_zero)

    def euler_into_data_by(self, option: bool | str | None) -> bool:
        """An ``euler_into_data`` option read against this teacher: ``None`` or ``"auto"`` is its
        own rule (:attr:`euler_into_data`), a bool is taken as given."""
        if option is None or isinstance(option, str):
            if option not in (None, "auto"):
                raise ValueError(f"euler_into_data must be 'auto', True or False, got {option!r}")
            return self.euler_into_data
        return bool(option)

    # ---- input checks (run on concrete arrays at the edges; no-ops under tracing) -------------
    def check_input(self, x: Array, t: Array | None = None) -> None:
        if tuple(x.shape[1:]) != tuple(self.data_shape):
            raise ValueError(
                f"teacher {self.name!r} expects samples of shape {tuple(self.data_shape)}, "
                f"got a batch of shape {tuple(x.shape)}"
            )
        if t is not None:
            from fewstep_jax.paths import check_time

            check_time(t)

    def condition(self, x: Array, label: Any = None) -> Any:
        """The condition of the batch ``x``: None (unconditional), class labels (B,) int32 (None ->
        the null class) or the conditioning pytree broadcast to batch B (None -> the null one)."""
        if self.null_condition is not None:
            return batch_condition(self.null_condition if label is None else label, x.shape[0])
        if self.num_classes == 0:
            return None
        if label is None:
            return jnp.full((x.shape[0],), NULL_LABEL, jnp.int32)
        return jnp.broadcast_to(jnp.asarray(label, jnp.int32), (x.shape[0],))

    def null_condition_of(self, x: Array) -> Any:
        """The unconditional branch's condition for the batch ``x`` (classifier-free guidance)."""
        return self.condition(x, None)

    # ---- predictions ---------------------------------------------------------------------------
    def predict(self, x: Array, t: Array, label: Array | None = None, guidance: float | Array = 1.0):
        """The native prediction, with classifier-free guidance (Imagen form) when ``guidance != 1``.

        ``guidance`` is the Imagen scale ``w``: ``p_u + w (p_c - p_u)``; LCM/TCD's ``w'`` is
        ``w = 1 + w'`` (docs/methods.md §1.4). Guidance needs a conditional teacher; the
        unconditional branch takes the null class or the teacher's ``null_condition``.
        """
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        p_c = self.apply(self.params, x, t, self.condition(x, label))
        if isinstance(guidance, (int, float)) and guidance == 1.0:
            return p_c
        if not self.conditional:
            raise ValueError(f"teacher {self.name!r} is unconditional: classifier-free guidance needs labels")
        p_u = self.apply(self.params, x, t, self.null_condition_of(x))
        w = jnp.asarray(guidance, p_c.dtype)
        if w.ndim == 1:
            w = w.reshape((-1,) + (1,) * (x.ndim - 1))
        return p_u + w * (p_c - p_u)

    def velocity(self, x: Array, t: Array, label: Array | None = None, guidance: float | Array = 1.0):
        """``dx/dt`` of the (guided) probability-flow ODE on the teacher's path, (B, ...)."""
        p = self.predict(x, t, label, guidance)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return self.path.convert(p, self.prediction, "flow", x, t)

    def x0_eps(self, x: Array, t: Array, label: Array | None = None, guidance: float | Array = 1.0):
        """``(x0, eps)`` predictions, each (B, ...)."""
        p = self.predict(x, t, label, guidance)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return self.path.to_x0_eps(p, self.prediction, x, t)

    def velocity_fn(self, label: Array | None = None, guidance: float | Array = 1.0) -> solvers.Velocity:
        """``velocity`` with the condition closed over, the form the solvers take."""
        return lambda x, t: self.velocity(x, t, label, guidance)

    # ---- flow map -----------------------------------------------------------------------------
    def solve(
        self,
        x: Array,
        grid,
        method: str = "euler",
        label: Array | None = None,
        guidance: float | Array = 1.0,
        return_trajectory: bool = False,
        euler_into_data: bool = False,
    ):
        """Approximates ``Phi(x, grid[0], grid[-1])`` with a fixed-step solver (see solvers.solve)."""
        v = self.velocity_fn(label, guidance)
        return solvers.solve(v, x, grid, method, self.path, return_trajectory, euler_into_data)

    def prior(self, rng: Array, n: int) -> Array:
        """``n`` samples of the noise the ODE starts from at t = 1: ``sigma(1) * eps``."""
        return self.path.prior_scale * jax.random.normal(rng, (n, *self.data_shape), jnp.float32)


def batch_condition(cond: Any, batch: int) -> Any:
    """A conditioning pytree with every leaf's leading axis broadcast to ``batch`` (a leaf of
    leading size 1, e.g. one null-prompt encoding, is repeated; size ``batch`` is kept)."""

    def one(a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.shape[0] not in (1, batch):
            raise ValueError(f"conditioning leaf of shape {tuple(a.shape)} has no batch axis of 1 or {batch}")
        return jnp.broadcast_to(a, (batch, *a.shape[1:]))

    return jax.tree.map(one, cond)


def condition_rows(label: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a condition: class labels as int32, or every leaf of a conditioning
    pytree (None stays None), for evaluating a teacher batch by batch."""
    if label is None:
        return None
    if isinstance(label, Mapping):
        return jax.tree.map(lambda a: jnp.asarray(a[lo:hi]), label)
    return jnp.asarray(label[lo:hi], jnp.int32)


__all__ = ["NULL_LABEL", "Teacher", "batch_condition", "condition_rows"]
