"""Multi-process set-up, the device mesh and the shardings of params and batches.

One `Mesh` over all devices of all processes with axes ("data", "fsdp"). Batches are split
over both axes (every device sees its own rows); params and optimizer state are replicated,
or, with fsdp > 1, large leaves are split over "fsdp" (ZeRO-3 style: XLA all-gathers them where
they are used). The same jitted step then runs on 1 CPU, 8 GPUs or a TPU pod.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# Set by launch/multiprocess.py for each child process.
ENV_COORDINATOR = "FEWSTEP_COORDINATOR"
ENV_NUM_PROCESSES = "FEWSTEP_NUM_PROCESSES"
ENV_PROCESS_ID = "FEWSTEP_PROCESS_ID"
ENV_DISTRIBUTED = "FEWSTEP_DISTRIBUTED"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start `jax.distributed` when asked to; returns whether it is running.

    Explicit arguments win; otherwise the FEWSTEP_* environment variables (set by
    launch/multiprocess.py) are used; `auto=True` (or FEWSTEP_DISTRIBUTED=auto) calls
    `jax.distributed.initialize()` with no arguments, which detects the cluster on Cloud TPU
    pods, SLURM and Kubernetes. With none of these it does nothing (single process).
    Idempotent. Must run before anything touches a device.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is None and os.environ.get(ENV_COORDINATOR):
        coordinator_address = os.environ[ENV_COORDINATOR]
        num_processes = num_processes or int(os.environ[ENV_NUM_PROCESSES])
        if process_id is None:
            process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator_address is not None
    # launch/tpu_pod.sh and launch/slurm.sbatch set FEWSTEP_DISTRIBUTED=auto on every worker
    auto = auto or os.environ.get(ENV_DISTRIBUTED, "") == "auto"
    if not explicit and not auto:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
            f"(got {num_processes!r}, {process_id!r})"
        )
    # Cross-process collectives on the CPU backend need gloo (the only CPU implementation built
    # into jaxlib wheels); it does not affect GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """Mesh of shape (data, fsdp) over every device of every process; -1 = all remaining.

    Axis types are `Auto`: plain `jax.jit` with `NamedSharding` in/out shardings then lets the
    compiler propagate shardings through model code that knows nothing about meshes.
    (`jax.make_mesh` defaults to `Explicit` since jax 0.9, where shardings become part of the
    types and ops such as reshapes of sharded dims must state their output sharding.)
    """
    n = jax.device_count()
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data, fsdp may be -1")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size} must be positive or -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n % known:
            raise ValueError(f"mesh axis size {known} does not divide the {n} devices")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    if data * fsdp != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {n} devices "
            "(the mesh must cover all devices of all processes)"
        )
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over all mesh axes: every device gets its own rows."""
    return NamedSharding(mesh, P(MESH_AXES))


def _leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    # Largest dim divisible by the fsdp size; ties go to the last dim (the output features of
    # a Dense/Conv kernel), so that layers split the same way.
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec: list[Any] = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def param_sharding(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """NamedSharding per leaf: leaves of >= min_size elements are split over "fsdp" along their
    largest dimension divisible by the fsdp size; all else (and everything when fsdp == 1) is
    replicated. Leaves may be arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place a pytree onto its shardings (a tree of the same structure, or one sharding).

    Every process must pass the same values: each device keeps the slice it owns.
    """
    return jax.device_put(tree, shardings)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Assemble each process's rows into global arrays split by `batch_sharding(mesh)`.

    local_batch: {name: (B_local, ...)} or nested dicts of such arrays (a text conditioning under
    "label"); process p holds rows [p*B_local, (p+1)*B_local) of the global batch of
    B_local * process_count rows, which must divide by the device count.
    """
    if not local_batch:
        raise ValueError("global_batch: empty batch")
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(dict(local_batch))}
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in flat.items()}
    for k, b in sizes.items():
        if b is None:
            raise ValueError(f"global_batch: batch entry {k!r} is a scalar; need a leading dim")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"global_batch: entries differ in their leading (batch) dim: {sizes}")
    local = next(iter(sizes.values()))
    n_proc, n_dev = jax.process_count(), mesh.devices.size
    total = local * n_proc
    if total % n_dev:
        raise ValueError(
            f"global batch {total} (= {local} per process x {n_proc} processes) does not divide "
            f"by the {n_dev} devices of the mesh"
        )
    sharding = batch_sharding(mesh)
    put = lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v), (total, *np.shape(v)[1:]))
    return jax.tree.map(put, dict(local_batch))
