#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod slice (jax.distributed auto-detects
# the pod; every worker must see the same workdir, e.g. a gs:// bucket).
#   TPU_NAME=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh configs/cifar10_traflow.py gs://bucket/runs/x
# First time: REPO_URL=... SETUP=1 bash launch/tpu_pod.sh ... clones the repo and installs it on all workers.
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
dir=${REMOTE_DIR:-fewstep-jax}
if [[ "${SETUP:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
    "git clone ${REPO_URL:?set REPO_URL} $dir 2>/dev/null || git -C $dir pull; cd $dir && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd $dir && FEWSTEP_DISTRIBUTED=auto .venv/bin/python -m fewstep_jax.main --config=$config --workdir=$workdir $*"
