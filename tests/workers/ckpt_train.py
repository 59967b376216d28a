"""Worker of tests/test_checkpoints.py: trains the tiny model with checkpoints and resumes.

Usage: ckpt_train.py WORKDIR STEPS SAVE_EVERY SLEEP_S
Prints "resumed N" (or "fresh") then "step i" after each step; on SIGTERM saves the current
step and exits 0 printing "preempted i"; at the end writes WORKDIR/final.npz (params).
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np
from tiny_model import batch, init_state, train_step

from fewstep_jax.runs import checkpoints


def main(workdir: str, steps: int, save_every: int, sleep: float) -> None:
    checkpoints.install_preemption_handler()
    ckpt = checkpoints.Checkpointer(Path(workdir) / "checkpoints", save_every, keep=2)
    state = init_state(0)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)
    restored = ckpt.restore_latest(abstract)
    start = 0
    if restored is None:
        print("fresh", flush=True)
    else:
        state, meta, start = restored
        assert meta == {"next_step": start}, meta
        assert int(state["step"]) == start
        print(f"resumed {start}", flush=True)
    step_fn = jax.jit(train_step, donate_argnums=0)
    for i in range(start, steps):
        state, _ = step_fn(state, batch(0, i))
        ckpt.save(i + 1, state, {"next_step": i + 1})
        print(f"step {i + 1}", flush=True)
        if ckpt.reached_preemption(i + 1):
            ckpt.save(i + 1, state, {"next_step": i + 1}, force=True)
            ckpt.wait()
            ckpt.close()
            print(f"preempted {i + 1}", flush=True)
            return
        time.sleep(sleep)
    ckpt.save(steps, state, {"next_step": steps}, force=True)
    ckpt.wait()
    ckpt.close()
    np.savez(Path(workdir) / "final.npz", **jax.tree.map(np.asarray, state["params"]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
