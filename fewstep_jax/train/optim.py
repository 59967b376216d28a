"""Optimizers from config: adam / adamw / radam, warm-up + cosine or constant lr, clipping."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "radam")
SCHEDULES = ("cosine", "constant")


def learning_rate(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``cfg.warmup_steps``, then cosine decay to
    ``cfg.lr * cfg.min_lr_ratio`` at ``num_steps``, or constant."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay = max(int(num_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay, alpha=float(cfg.min_lr_ratio))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """optax chain: global-norm clipping (``cfg.grad_clip > 0``) then the named optimizer."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r}; expected one of {OPTIMIZERS}")
    lr = learning_rate(cfg, num_steps)
    b1, b2, eps = float(cfg.b1), float(cfg.b2), float(cfg.eps)
    if cfg.name == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=float(cfg.weight_decay))
    else:
        opt = optax.radam(lr, b1=b1, b2=b2, eps=eps)
    if float(cfg.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), opt)
    return opt


__all__ = ["OPTIMIZERS", "SCHEDULES", "learning_rate", "make_optimizer"]
