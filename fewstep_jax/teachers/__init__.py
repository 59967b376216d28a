"""Teachers: one interface (:class:`Teacher`) over analytic, neural and imported sources."""

from fewstep_jax.teachers.base import NULL_LABEL, Teacher

__all__ = ["NULL_LABEL", "Teacher"]
