"""The train state: one pytree holding everything a run carries from step to step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fewstep_jax.train.optim import make_optimizer

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Attributes:
    step: int32 scalar, number of steps done.
    params: the trained network (the student when distilling, the teacher network when
      training a teacher).
    ema: name -> EMA params of ``params``: "eval" always, "target" when a method needs one.
    opt_state: optax state of ``params``.
    rng: raw uint32 key; the step's key is ``fold_in(rng, step)`` (rng itself never changes).
    aux: name -> {"params", "opt_state", "ema"?} for extra networks with their own optimizer.
    num_skipped: int32, updates skipped for a non-finite loss/gradient (train.skip_nonfinite).
    """

    step: Array
    params: Any
    ema: dict
    opt_state: Any
    rng: Array
    aux: dict
    num_skipped: Array


def ema_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """EMA copies of the main network: "eval" always, "target" when ema.target_decay >= 0."""
    return ("eval", "target") if float(config.ema.target_decay) >= 0 else ("eval",)


def make_optimizers(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, dict]:
    """The main network's optimizer and one per aux network (its own ``optim`` block if it has
    one, else a copy of ``config.optim`` with the aux block's ``lr`` when given)."""
    steps = int(config.train.num_steps)
    aux = {}
    for name, acfg in config.aux_nets.items():
        ocfg = ml_collections.ConfigDict(config.optim.to_dict())
        for k, v in acfg.get("optim", {}).items():
            if k not in ocfg:
                raise ValueError(f"aux_nets.{name}.optim.{k}: unknown optimizer key; known: {sorted(ocfg)}")
            ocfg[k] = v
        aux[name] = make_optimizer(ocfg, steps)
    return make_optimizer(config.optim, steps), aux


def create_state(
    config: ml_collections.ConfigDict,
    init_params: Callable[[Array], Any],
    aux_init: dict[str, Callable[[Array], Any]] | None = None,
    params: Any = None,
) -> TrainState:
    """A fresh state (jit-able: pure in ``config.seed``).

    init_params: key -> params of the main network (ignored when ``params`` is given, e.g. a
      student initialised from its teacher). aux_init: name -> (key -> params), the keys of
      ``config.aux_nets``.
    """
    aux_init = aux_init or {}
    if set(aux_init) != set(config.aux_nets.keys()):
        raise ValueError(
            f"aux networks {sorted(aux_init)} do not match config.aux_nets {sorted(config.aux_nets.keys())}"
        )
    tx, aux_tx = make_optimizers(config)
    root = jax.random.PRNGKey(int(config.seed))
    k_main, k_aux, k_rng = jax.random.split(root, 3)
    if params is None:
        params = init_params(k_main)
    aux = {}
    for i, name in enumerate(sorted(aux_init)):
        p = aux_init[name](jax.random.fold_in(k_aux, i))
        entry = {"params": p, "opt_state": aux_tx[name].init(p)}
        if float(config.aux_nets[name].get("ema_decay", -1.0)) >= 0:
            entry["ema"] = jax.tree.map(jnp.copy, p)  # own buffers: the state is donated
        aux[name] = entry
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema={n: jax.tree.map(jnp.copy, params) for n in ema_names(config)},
        opt_state=tx.init(params),
        rng=k_rng,
        aux=aux,
        num_skipped=jnp.zeros((), jnp.int32),
    )


__all__ = ["TrainState", "create_state", "ema_names", "make_optimizers"]
