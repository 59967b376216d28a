"""Training engine: the TrainState, the jitted train step, the loop, and metric writers.

`fewstep_jax.parallel` (mesh, shardings, multi-process) and `fewstep_jax.runs.checkpoints` (orbax,
preemption) are the distributed edges the loop calls; `writers` holds TensorBoard / JSONL
metric writers, the progress line and image grids.
"""
