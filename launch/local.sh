#!/usr/bin/env bash
# One process on this machine (all its devices).
#   bash launch/local.sh configs/default.py runs/default [--config.seed=1 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python -m fewstep_jax.main --config="$config" --workdir="$workdir" "$@"
