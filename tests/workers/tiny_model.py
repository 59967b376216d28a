"""A tiny MLP regression trained with optax adam, shared by the parallel/checkpoint tests and
the worker scripts they spawn. The batch of step i is a pure function of (seed, i)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

D_IN, HIDDEN, GLOBAL_BATCH = 4, 64, 32
TX = optax.adam(1e-2)


def init_params(seed: int = 0) -> dict:
    """{'w0': (4, 64), 'b0': (64,), 'w1': (64, 64), 'b1': (64,), 'w2': (64, 1), 'b2': (1,)}."""
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "w0": jax.random.normal(k0, (D_IN, HIDDEN)) / 2.0,
        "b0": jnp.zeros((HIDDEN,)),
        "w1": jax.random.normal(k1, (HIDDEN, HIDDEN)) / 8.0,
        "b1": jnp.zeros((HIDDEN,)),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / 8.0,
        "b2": jnp.zeros((1,)),
    }


def init_state(seed: int = 0) -> dict:
    params = init_params(seed)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt": TX.init(params),
        "rng": jax.random.PRNGKey(seed + 1),
    }


def batch(seed: int, step: int, batch_size: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
    """Global batch of step `step`: x (B, 4) float32, y (B, 1) float32."""
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(batch_size, D_IN)).astype(np.float32)
    y = np.sin(x).sum(axis=1, keepdims=True).astype(np.float32)
    return {"x": x, "y": y}


def loss_fn(params: dict, b: dict) -> jax.Array:
    h = jnp.tanh(b["x"] @ params["w0"] + params["b0"])
    h = jnp.tanh(h @ params["w1"] + params["b1"])
    pred = h @ params["w2"] + params["b2"]
    return jnp.mean((pred - b["y"]) ** 2)


def train_step(state: dict, b: dict) -> tuple[dict, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], b)
    updates, opt = TX.update(grads, state["opt"], state["params"])
    new = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt": opt,
        # Exercise a uint32 key in the state: it must survive checkpoints bit-exactly.
        "rng": jax.random.fold_in(state["rng"], state["step"]),
    }
    return new, loss
