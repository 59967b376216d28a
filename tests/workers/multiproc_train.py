"""Worker of tests/test_parallel.py, started by launch/multiprocess.py in each process.

Trains the tiny model for a few steps on a (data, fsdp) mesh over all processes' devices, each
process feeding its own rows of the global batch; process 0 writes the final params and losses.
Usage: multiproc_train.py OUT.npz STEPS DATA FSDP MIN_SIZE
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from tiny_model import batch, init_state, train_step

from fewstep_jax import parallel


def main(out: str, steps: int, data: int, fsdp: int, min_size: int) -> None:
    assert parallel.initialize_distributed(), "FEWSTEP_* environment variables not set"
    assert jax.process_count() == 2, jax.process_count()
    mesh = parallel.make_mesh(data, fsdp)
    state = init_state(0)
    state_sh = parallel.param_sharding(state, mesh, min_size=min_size)
    state = parallel.shard_tree(state, state_sh)
    step = jax.jit(
        train_step,
        in_shardings=(state_sh, parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    n, p = jax.process_count(), jax.process_index()
    losses = []
    for i in range(steps):
        full = batch(0, i)
        rows = full["x"].shape[0] // n
        local = {k: v[p * rows : (p + 1) * rows] for k, v in full.items()}
        state, loss = step(state, parallel.global_batch(local, mesh))
        losses.append(float(loss))
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    sharded = [k for k, v in state["params"].items() if not v.sharding.is_fully_replicated]
    if p == 0:
        np.savez(
            out,
            losses=np.array(losses),
            sharded=np.array(sharded, dtype=str),
            **{f"p_{k}": np.asarray(v) for k, v in params.items()},
        )


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
