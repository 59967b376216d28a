"""The contract between loss terms and the train step.

A loss term is a pure function

    term(params, inputs: LossInputs, batch: dict, rng) -> (scalar float32, metrics: dict[str, scalar])

differentiated with respect to ``params`` (the parameters of the network it trains: the student,
or an auxiliary network such as the fake score). Everything else it may read is in ``inputs``
and must be treated as constant (the train step also wraps it in ``stop_gradient``).

Terms are built by factories registered by name: ``@register("traflow_rec")`` on
``factory(cfg: ConfigDict, student: Student) -> term``; ``cfg`` is the term's config block
(its ``weight`` is applied by the train step, the rest are the term's own hyper-parameters, read
by :func:`fewstep_jax.losses.options.read_options`). Every family module registers its terms when
imported, and ``fewstep_jax/losses/__init__.py`` imports every family, so any import of this
module (which runs the package's ``__init__`` first) sees the full registry.

Teacher cost: every term that calls the teacher reports ``teacher_nfe`` in its metrics (logged as
``<term>/teacher_nfe``): the mean number of teacher network evaluations per training example in
that step, counting the evaluations the term's code really makes (padded solver steps and the
unconditional call of classifier-free guidance included; see :func:`teacher_evals_per_call`).
Terms that never call the teacher report no such key; a method's teacher cost per example is the
sum of its terms' ``teacher_nfe``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax

from fewstep_jax.students import Student
from fewstep_jax.teachers.base import Teacher

Array = jax.Array


@flax.struct.dataclass
class LossInputs:
    """What a loss term may read besides its own params (all constant for the gradient).

    Attributes:
      teacher: the frozen teacher (None when training a teacher).
      student: the student's flow-map wrapper (static).
      ema: EMA copies of the trained network's params, e.g. ``{"target": ..., "eval": ...}``.
      others: current params of the other networks of the run, e.g. ``{"student": ...}`` for the
        fake-score loss, ``{"fake": ...}`` for the generator loss.
      step: the global step (int32 scalar).
      nets: static ``(name, Student)`` pairs wrapping the other networks (e.g. the fake score),
        so a term can call ``inputs.net("fake").x0_eps(inputs.others["fake"], x, t)``.
    """

    teacher: Teacher | None
    student: Student | None
    ema: dict
    others: dict
    step: Array
    nets: tuple = flax.struct.field(pytree_node=False, default=())

    def net(self, name: str) -> Student:
        for n, s in self.nets:
            if n == name:
                return s
        raise KeyError(f"no network {name!r} in this run; networks: {[n for n, _ in self.nets]}")


LossTerm = Callable[[Any, LossInputs, dict, Array], tuple[Array, dict]]
LossFactory = Callable[..., LossTerm]

_REGISTRY: dict[str, LossFactory] = {}


def teacher_evals_per_call(guidance: Any) -> int:
    """Network evaluations of one ``Teacher.predict`` call (velocity, x0_eps, a solver stage).

    Mirrors :meth:`Teacher.predict`: a Python scalar guidance of exactly 1 costs one evaluation;
    any other guidance (a scale != 1, or an array, even of ones) adds the unconditional call.
    """
    return 1 if isinstance(guidance, (int, float)) and guidance == 1.0 else 2


def register(name: str) -> Callable[[LossFactory], LossFactory]:
    """Registers a loss-term factory under ``name`` (a name may be registered once)."""

    def deco(factory: LossFactory) -> LossFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"loss term {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def get_factory(name: str) -> LossFactory:
    """The factory registered as ``name``; unknown names list the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss term {name!r}; known terms: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered() -> list[str]:
    """Every registered term name, sorted."""
    return sorted(_REGISTRY)


__all__ = [
    "LossFactory",
    "LossInputs",
    "LossTerm",
    "get_factory",
    "register",
    "registered",
    "teacher_evals_per_call",
]
