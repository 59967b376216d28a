"""Test session set-up: 8 simulated CPU devices so sharding tests run on any machine."""

import os
import tempfile

# Must happen before jax initialises its backend (any test module importing jax comes later).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by both xdist workers and every subprocess a test
# starts: the same train step is compiled by a run, its killed twin and its resumed twin (a cold
# cache saved 16% of the wall time of the train-loop, checkpoint and pipeline tests; a warm one,
# on a developer's second run, about half of every compile). Keys hold the program, the devices
# and the jax/jaxlib versions, so a stale entry is never used.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fewstep_jax_tests_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax

jax.config.update("jax_enable_x64", False)
