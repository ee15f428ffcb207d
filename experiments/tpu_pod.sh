#!/usr/bin/env bash
# Train nin-jax on a Cloud TPU pod slice: one process per TPU VM host, all joined
# through jax.distributed (JAX finds the slice's hosts from the TPU metadata).
#
#   TPU_NAME=nin-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#       bash experiments/tpu_pod.sh [create|setup|train|delete]
#
# `create` makes the slice, `setup` installs nin-jax on every host, `train` runs
# configs/cifar10_tpu.py on every host with its workdir on Cloud Storage (the same
# command again resumes from the newest checkpoint; a preempted slice gets SIGTERM,
# saves and exits 0). TFDS data must be prepared in $BUCKET/tensorflow_datasets
# (see the README's "Preparing TFDS data offline"). Extra arguments after the
# action go to nin_jax.main, e.g. `train --config.train.num_epochs=50`.
set -euo pipefail

action=${1:-train}
shift || true
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || echo "")}
CONFIG=${CONFIG:-configs/cifar10_tpu.py}
WORKDIR=${WORKDIR:-$BUCKET/nin_jax/$(basename "$CONFIG" .py)}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
      --command="$1"
}

case "$action" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    [ -n "$REPO_URL" ] || { echo "set REPO_URL to a clone URL of nin-jax" >&2; exit 2; }
    on_all_workers "set -e; rm -rf nin-jax; git clone -q '$REPO_URL' nin-jax && \
        cd nin-jax && pip install -q -U 'jax[tpu]' && pip install -q -e '.[tfds,gcs]'"
    ;;
  train)
    on_all_workers "cd nin-jax && python -m nin_jax.main --config='$CONFIG' \
        --workdir='$WORKDIR' --distributed=on \
        --config.data.data_dir='$BUCKET/tensorflow_datasets' $*"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    echo "usage: $0 [create|setup|train|delete] [nin_jax.main arguments]" >&2
    exit 2
    ;;
esac
