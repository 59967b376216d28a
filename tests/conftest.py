"""Test session set-up: 8 simulated CPU devices so sharding tests run on any machine."""

import os

# Must happen before jax initialises its backend (any test module importing jax comes later).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_enable_x64", False)
