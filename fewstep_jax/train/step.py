"""The jitted train step: aux networks and the main network update in one program.

``train_step(state, teacher, batch) -> (state, metrics)`` is pure. The teacher is an argument
(a pytree whose params are leaves), so its weights are never compiled in nor checkpointed.
Loss terms come from the registry by config: ``config.losses = {term: {"weight": w, ...}}`` for
the main network and ``config.aux_nets.<name>.losses`` for an aux network. Each term gets its
own gradient (so a non-finite value is traced to the term that produced it); the network's
update uses the weighted sum.

Metrics (float32 scalars): ``loss`` (weighted total of the main net), ``loss/<term>`` (raw),
``weighted/<term>``, ``<term>/<metric>`` (the term's own), ``nonfinite/<term>`` (1.0 if the
term's loss or gradient is not finite), ``grad_norm``, ``skipped``; aux nets prefix with
``<name>/``. ``train.main_every`` (TTUR) and ``train.main_start`` (aux-only warm-up: the main
network is not updated before that step) gate the main network's update.

Update order, per aux network (``config.aux_nets.<name>.order``):

* ``"first"`` (default; TDM's demo): the aux network updates before the main network, which then
  reads the aux's *updated* params;
* ``"after_main"`` (DMD2's ``train_edm.py``): the main network updates first, reading the aux's
  pre-update params, and the aux trains on the main network's pre-update params (the generator's
  samples of this step, before its update).

Either way an aux network reads the main network's params of the start of the step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from fewstep_jax import parallel
from fewstep_jax.losses.api import LossInputs, get_factory
from fewstep_jax.students import Student, with_base
from fewstep_jax.train.state import TrainState, make_optimizers

Array = jax.Array
MAIN = "student"  # the main network's name in LossInputs.others
AUX_ORDERS = ("first", "after_main")


class Term(NamedTuple):
    name: str
    weight: float
    fn: Callable


def build_terms(losses: ml_collections.ConfigDict, student: Student, where: str) -> tuple[Term, ...]:
    """Loss terms of one network from its ``losses`` block, sorted by name."""
    if not losses:
        raise ValueError(f"{where} has no loss terms: set {where}.<term>.weight")
    terms = []
    for name in sorted(losses.keys()):
        cfg = losses[name]
        if "weight" not in cfg:
            raise ValueError(f"{where}.{name} needs a 'weight'")
        kwargs = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "weight"})
        terms.append(Term(name, float(cfg.weight), get_factory(name)(kwargs, student)))
    return tuple(terms)


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(ok: Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _ema(decay, ema, params):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(decay: float, rampup_ratio: float, num_updates: Array) -> Array:
    """EMA decay after ``num_updates`` updates with EDM's ramp-up (Karras et al. 2022): the
    EMA's half-life (in updates) is ``min(half-life of decay, rampup_ratio * num_updates)``, so
    a short run's average is not dominated by its initial params (at 60 updates a fixed 0.99 still
    holds 55% of them). ``rampup_ratio <= 0``: the fixed ``decay``."""
    decay = float(decay)
    if rampup_ratio <= 0 or not 0.0 < decay < 1.0:
        return jnp.asarray(decay, jnp.float32)
    half_life = math.log(0.5) / math.log(decay)
    ramped = jnp.minimum(half_life, float(rampup_ratio) * jnp.asarray(num_updates, jnp.float32))
    return jnp.power(0.5, 1.0 / jnp.maximum(ramped, 1e-8))


def _loss_and_grads(terms, params, inputs, batch, keys, prefix: str, bind=None):
    """Per-term losses and gradients, the weighted total and the metrics of one network; ``bind``
    maps the differentiated params to what the network takes (a LoRA's adapters joined with its
    base: the gradient is the adapters')."""
    metrics, total, grads, finite = {}, jnp.zeros((), jnp.float32), None, []
    for term, key in zip(terms, keys, strict=True):
        fn = term.fn if bind is None else (lambda p, *a, fn=term.fn: fn(bind(p), *a))
        (loss, tm), g = jax.value_and_grad(fn, has_aux=True)(params, inputs, batch, key)
        loss = loss.astype(jnp.float32)
        ok = jnp.isfinite(loss) & _all_finite(g)
        finite.append(ok)
        metrics[f"{prefix}loss/{term.name}"] = loss
        metrics[f"{prefix}weighted/{term.name}"] = term.weight * loss
        metrics[f"{prefix}nonfinite/{term.name}"] = (~ok).astype(jnp.float32)
        for k, v in tm.items():
            metrics[f"{prefix}{term.name}/{k}"] = jnp.asarray(v, jnp.float32)
        total = total + term.weight * loss
        w = term.weight
        g = jax.tree.map(lambda x, w=w: w * x.astype(jnp.float32), g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    metrics[f"{prefix}loss"] = total
    metrics[f"{prefix}grad_norm"] = optax.global_norm(grads)
    return grads, metrics, jnp.all(jnp.stack(finite))


def make_step_fn(
    config: ml_collections.ConfigDict, student: Student, nets: dict[str, Student] | None = None
) -> Callable:
    """The pure (un-jitted) ``step(state, teacher, batch) -> (state, metrics)``."""
    nets = dict(nets or {})
    if set(nets) != set(config.aux_nets.keys()):
        raise ValueError(
            f"aux networks {sorted(nets)} do not match config.aux_nets {sorted(config.aux_nets.keys())}"
        )
    tx, aux_tx = make_optimizers(config)
    main_terms = build_terms(config.losses, student, "config.losses")
    aux_terms = {
        n: build_terms(config.aux_nets[n].losses, nets[n], f"config.aux_nets.{n}.losses") for n in nets
    }
    aux_order = sorted(nets)
    order = {n: config.aux_nets[n].get("order", "first") for n in aux_order}
    for n, o in order.items():
        if o not in AUX_ORDERS:
            raise ValueError(f"config.aux_nets.{n}.order={o!r}; expected one of {AUX_ORDERS}")
    static_nets = (*((n, nets[n]) for n in aux_order), (MAIN, student))
    ema_decay = {"eval": float(config.ema.decay), "target": float(config.ema.target_decay)}
    # only the evaluated average ramps up: the target EMA is part of a consistency loss
    ema_rampup = {"eval": float(config.ema.get("rampup_ratio", 0.0)), "target": 0.0}
    skip = bool(config.train.skip_nonfinite)
    main_every = int(config.train.get("main_every", 1))
    # aux-only warm-up (e.g. a fake score that has no teacher network to start from)
    main_start = int(config.train.get("main_start", 0))
    num_keys = len(main_terms) + sum(len(t) for t in aux_terms.values())

    def step(state: TrainState, teacher: Any, batch: dict) -> tuple[TrainState, dict]:
        keys = list(jax.random.split(jax.random.fold_in(state.rng, state.step), num_keys))
        sg = jax.lax.stop_gradient
        # a LoRA network's params (and EMA) are adapters: joined with the teacher's params (its
        # base, the same arrays) wherever a loss calls the network
        by_name = {MAIN: student, **nets}
        bind = {n: functools.partial(with_base, net, teacher=teacher) for n, net in by_name.items()}
        metrics: dict[str, Array] = {}
        all_ok = []
        aux = dict(state.aux)
        # aux networks first: they see the main network's current params
        for name in aux_order:
            entry, terms = aux[name], aux_terms[name]
            acfg = config.aux_nets[name]
            others = {MAIN: state.params, **{n: aux[n]["params"] for n in aux_order if n != name}}
            others = {n: bind[n](sg(p)) for n, p in others.items()}
            ema = {k: bind[name](sg(e)) for k, e in entry.get("ema", {}).items()}
            inputs = LossInputs(teacher, student, ema, others, state.step, static_nets)
            ks, keys = keys[: len(terms)], keys[len(terms) :]
            grads, m, ok = _loss_and_grads(
                terms,
                entry["params"],
                inputs,
                batch,
                ks,
                f"{name}/",
                bind[name] if nets[name].shares_base else None,
            )
            metrics.update(m)
            upd, opt = aux_tx[name].update(grads, entry["opt_state"], entry["params"])
            new = {"params": optax.apply_updates(entry["params"], upd), "opt_state": opt}
            if "ema" in entry:
                new["ema"] = _ema(float(acfg.ema_decay), entry["ema"], new["params"])
            due = (state.step % int(acfg.get("update_every", 1))) == 0
            do = due & ok if skip else due
            aux[name] = _select(do, new, entry)
            all_ok.append(ok)
        # the main network reads an "after_main" aux network's params of the start of the step
        others = {n: (aux if order[n] == "first" else state.aux)[n]["params"] for n in aux_order}
        others = {n: bind[n](sg(p)) for n, p in others.items()}
        ema = {k: bind[MAIN](sg(e)) for k, e in state.ema.items()}
        inputs = LossInputs(teacher, student, ema, others, state.step, static_nets)
        main_bind = bind[MAIN] if student.shares_base else None
        grads, m, ok = _loss_and_grads(main_terms, state.params, inputs, batch, keys, "", main_bind)
        metrics.update(m)
        upd, opt = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        # main-network updates so far, this one included (none before main_start)
        updates = jnp.maximum(state.step - main_start, 0) // main_every + 1
        decays = {n: ema_decay_at(ema_decay[n], ema_rampup[n], updates) for n in state.ema}
        ema = {n: _ema(decays[n], e, params) for n, e in state.ema.items()}
        due = ((state.step % main_every) == 0) & (state.step >= main_start)
        do = due & ok if skip else due
        params, opt, ema = _select(do, (params, opt, ema), (state.params, state.opt_state, state.ema))
        all_ok.append(ok)
        good = jnp.all(jnp.stack(all_ok))
        skipped = (~good).astype(jnp.int32) if skip else jnp.zeros((), jnp.int32)
        metrics["skipped"] = skipped.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema=ema,
            opt_state=opt,
            aux=aux,
            num_skipped=state.num_skipped + skipped,
        )
        metrics["num_skipped"] = new_state.num_skipped.astype(jnp.float32)
        return new_state, metrics

    return step


def state_shardings(state: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """Shardings of a (possibly abstract) TrainState: params, EMA and optimizer state split over
    "fsdp" by parallel.param_sharding, scalars and the rng replicated."""
    return parallel.param_sharding(state, mesh, min_size=min_size)


def make_train_step(
    config: ml_collections.ConfigDict,
    student: Student,
    nets: dict[str, Student] | None = None,
    *,
    mesh: Mesh | None = None,
    state_sharding: Any = None,
) -> Callable:
    """``jax.jit`` of :func:`make_step_fn`, the state donated.

    With a ``mesh``: in/out shardings are ``state_sharding`` for the state (required; see
    :func:`state_shardings`), the teacher replicated and the batch split by
    ``parallel.batch_sharding``; metrics come back replicated.
    """
    fn = make_step_fn(config, student, nets)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    if state_sharding is None:
        raise ValueError("make_train_step: a mesh needs state_sharding (see state_shardings)")
    return jax.jit(
        fn,
        in_shardings=(state_sharding, parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
    )


__all__ = [
    "AUX_ORDERS",
    "MAIN",
    "Term",
    "build_terms",
    "ema_decay_at",
    "make_step_fn",
    "make_train_step",
    "state_shardings",
]
