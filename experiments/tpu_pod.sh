#!/usr/bin/env bash
# Train nin-jax on a Cloud TPU pod slice: one process per TPU VM host, all joined
# through jax.distributed (JAX finds the slice's hosts from the TPU metadata).
#
#   TPU_NAME=nin-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#       bash experiments/tpu_pod.sh [--dry-run] ACTION [nin_jax.main arguments]
#
# Actions:
#   create  make the slice
#   setup   clone nin-jax on every host and install it with the `tpu` extra: jax,
#           jaxlib and the libtpu that jax release pins, resolved together within
#           nin-jax's jax bounds (a separate `pip install -U jax[tpu]` would fetch a
#           newer jax, which `pip install -e .` then downgrades without libtpu)
#   train   start configs/cifar10_tpu.py (CONFIG=...) on every host, detached: the
#           run outlives the ssh session; each host logs to ~/nin-jax-train.log
#           and keeps its process id in ~/nin-jax-train.pid. The workdir is in the
#           bucket, so the same command again resumes from the newest checkpoint,
#           and a preempted slice gets SIGTERM, saves and exits 0. Refused while a
#           run is going on. Extra arguments go to nin_jax.main, e.g.
#           `train --config.train.num_epochs=50`.
#   status  each host: running (with its process id) or not, and its log's last line
#   logs    each host: the last 50 lines of its log (TAIL_LINES=N for more)
#   stop    SIGTERM to each host's run: it saves a checkpoint and exits
#   delete  delete the slice; refused while a run is going on (stop it first, or
#           FORCE=1 to delete anyway: the run dies without saving)
#
# --dry-run prints the gcloud commands instead of running them. TFDS data must be
# prepared in $BUCKET/tensorflow_datasets (docs/data.md, "Preparing TFDS data
# offline"); docs/scaling.md says what was proven without a slice.
set -euo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
action=${1:-}
shift || true
usage="usage: $0 [--dry-run] create|setup|train|status|logs|stop|delete [nin_jax.main arguments]"
case "$action" in
  create|setup|train|status|logs|stop|delete) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
case "$BUCKET" in
  gs://?*) ;;
  *) echo "BUCKET=$BUCKET: must be a Cloud Storage URL, gs://NAME (a TPU VM's disk goes with the VM)" >&2; exit 2 ;;
esac
BUCKET=${BUCKET%/}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/cifar10_tpu.py}
WORKDIR=${WORKDIR:-$BUCKET/nin_jax/$(basename "$CONFIG" .py)}
LOG='$HOME/nin-jax-train.log'
PID='$HOME/nin-jax-train.pid'
# True on a host whose run is alive.
RUNNING="[ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null"

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
      --command="$1"
}

# Exits 2 if a host's run is alive (not checked in a dry run).
refuse_if_running() {
  [ "$dry_run" = 1 ] && return 0
  local out
  out=$(on_all_workers "if $RUNNING; then echo 'nin-jax: running'; fi" 2>&1) || true
  if printf '%s\n' "$out" | grep -q 'nin-jax: running'; then
    echo "$0 $action: a nin-jax run is going on on $TPU_NAME ($1)" >&2
    exit 2
  fi
}

case "$action" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
    [ -n "$REPO_URL" ] || { echo "set REPO_URL to a clone URL of nin-jax" >&2; exit 2; }
    on_all_workers "set -e; rm -rf nin-jax; git clone -q '$REPO_URL' nin-jax && \
cd nin-jax && pip install -q -e '.[tpu,tfds,gcs]'"
    ;;
  train)
    refuse_if_running "'status' shows it; 'stop' ends it"
    args=""
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    # Only python goes to the background (with every stream redirected), so
    # the ssh session ends at once and $! is the run's own process id.
    on_all_workers "cd nin-jax || exit 1; nohup python -m nin_jax.main \
--config='$CONFIG' --workdir='$WORKDIR' --distributed=on \
--config.data.data_dir='$BUCKET/tensorflow_datasets'$args \
> $LOG 2>&1 < /dev/null & echo \$! > $PID"
    ;;
  status)
    on_all_workers "if $RUNNING; then echo \"\$(hostname): running (pid \$(cat $PID))\"; \
else echo \"\$(hostname): not running\"; fi; tail -n 1 $LOG 2>/dev/null || true"
    ;;
  logs)
    on_all_workers "echo \"== \$(hostname)\"; tail -n ${TAIL_LINES:-50} $LOG 2>/dev/null || echo 'no log'"
    ;;
  stop)
    on_all_workers "if $RUNNING; then kill -TERM \$(cat $PID); echo \"\$(hostname): SIGTERM sent\"; fi"
    ;;
  delete)
    [ "${FORCE:-0}" = 1 ] || refuse_if_running "'stop' it first, or FORCE=1 to delete anyway"
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
esac
