#!/usr/bin/env bash
# Data-parallel jaxdiff on a Cloud TPU VM pod: the same command on every worker (gcloud compute tpus tpu-vm ssh
# --worker=all); jax.distributed.initialize() finds the pod's coordinator and process ids by itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [--mode=MODE] [--config.FIELD=VALUE ...]
#   e.g.  SETUP=1 BUCKET=my-bucket launch/tpu_pod.sh my-v4-32 us-central2-b /mnt/my-bucket/cifar_edm configs/cifar_edm.py
#
# WORKDIR must be one directory that every worker sees (checkpoints are written by all workers together): a
# Cloud Storage bucket mounted with gcsfuse (BUCKET=NAME mounts gs://NAME at /mnt/NAME on every worker; gcsfuse
# must be installed there) or an NFS share such as Filestore. CONFIG defaults to configs/cifar_edm.py; paths of
# CONFIG are inside the checkout on the workers. training.batch_size is the GLOBAL batch: it must divide by the
# pod's chip count. Environment: PROJECT (default: gcloud's), JAXDIFF_DIR (the checkout on the workers, default
# jaxdiff in the home directory), SETUP=1 (first copy this checkout's files there and pip install it with
# jax[tpu]), PYTHON (default python3), DRY_RUN=1 (print the gcloud commands instead of running them).
set -euo pipefail
if [ $# -lt 3 ]; then
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"  # the comment above
  exit 2
fi
tpu=$1 zone=$2 workdir=$3
shift 3
config=configs/cifar_edm.py
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
  config=$1
  shift
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=${JAXDIFF_DIR:-jaxdiff}
python=${PYTHON:-python3}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" ${PROJECT:+--project="$PROJECT"} --worker=all)

run() {  # prints the command (DRY_RUN=1) or runs it
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [ "${SETUP:-0}" = 1 ]; then
  archive=$(mktemp -t jaxdiff.XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  # the checkout's tracked and untracked files, without what git ignores (virtual environments, runs, caches)
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu:jaxdiff.tar.gz" "${where[@]}"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$(printf 'mkdir -p %q && tar -xzf jaxdiff.tar.gz -C %q && %q -m pip install -U %q && %q -m pip install -e %q' \
    "$remote_dir" "$remote_dir" "$python" 'jax[tpu]' "$python" "$remote_dir")"
fi
if [ -n "${BUCKET:-}" ]; then
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$(printf 'sudo mkdir -p /mnt/%q && sudo chown "$USER" /mnt/%q && (mountpoint -q /mnt/%q || gcsfuse --implicit-dirs %q /mnt/%q)' \
    "$BUCKET" "$BUCKET" "$BUCKET" "$BUCKET" "$BUCKET")"
fi

train=("$python" -m jaxdiff.main --config="$config" --workdir="$workdir" --config.distributed.initialize=True "$@")
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="cd $(printf '%q' "$remote_dir") && $(printf '%q ' "${train[@]}")"
