"""The networks a run trains, built from its config: a teacher network to train, or a distillation
run's student and auxiliary networks (the fake score of DMD / TDM), each a :class:`Net`.

:func:`build_student` is the one place a :class:`~fewstep_jax.students.Student` is made from a
model config (also for sampling a finished run, ``modes.sample.run_student``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fewstep_jax.models import build_model, init_student_from_teacher
from fewstep_jax.paths import Path, get_path
from fewstep_jax.students import Student, model_apply
from fewstep_jax.train.loop import Net


def build_student(
    model_cfg: ml_collections.ConfigDict,
    path: Path,
    *,
    form: str = "euler",
    prediction: str = "flow",
    uses_s: bool | None = None,
) -> Student:
    """The network of ``model_cfg`` as a Student of ``form`` whose output is a ``prediction`` on
    ``path``; ``uses_s`` None: whether the model takes the target time (``model_cfg.use_s``)."""
    return Student(
        model_apply(build_model(model_cfg)),
        path,
        form=form,
        prediction=prediction,
        uses_s=bool(model_cfg.get("use_s", False)) if uses_s is None else uses_s,
    )


def param_init(
    model_cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...], teacher_params: Any = None
) -> Callable[[jax.Array], Any]:
    """``init(key) -> params`` of the network of ``model_cfg`` on samples of ``data_shape``; with
    ``teacher_params``, copied from the teacher where the shapes match
    (:func:`~fewstep_jax.models.init_student_from_teacher`)."""
    model = build_model(model_cfg)

    def init(key):
        x, t = jnp.zeros((1, *data_shape), jnp.float32), jnp.ones((1,), jnp.float32)
        params = model.init(key, x, t)["params"]
        return params if teacher_params is None else init_student_from_teacher(params, teacher_params)

    return init


def teacher_network(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> Net:
    """The teacher network to train: a model of ``config.model`` predicting
    ``config.teacher.prediction`` on the testbed's path."""
    student = build_student(
        config.model, get_path(config.testbed.path), prediction=config.teacher.prediction, uses_s=False
    )
    return Net(student, param_init(config.model, data_shape))


def distill_nets(config: ml_collections.ConfigDict, teacher, data_shape) -> tuple[Net, dict[str, Net]]:
    """The student (``config.model``, ``config.student``) and the aux networks of ``config.aux_nets``
    on the teacher's path, initialised from a network teacher's params where asked."""
    # only a network teacher has params a student can copy (an analytic one holds data arrays)
    neural = bool(config.teacher.workdir)

    def net(model_cfg, form, prediction, from_teacher) -> Net:
        student = build_student(model_cfg, teacher.path, form=form, prediction=prediction)
        return Net(student, param_init(model_cfg, data_shape, teacher.params if from_teacher else None))

    sc = config.student
    main = net(config.model, sc.form, sc.prediction, neural and sc.init_from_teacher)
    aux = {
        name: net(
            a.get("model", config.model),
            "euler",
            a.get("prediction", "flow"),
            neural and a.get("init_from_teacher", True),
        )
        for name, a in config.aux_nets.items()
    }
    return main, aux


__all__ = ["build_student", "distill_nets", "param_init", "teacher_network"]
