#!/usr/bin/env bash
# Multi-host data-parallel training: run THIS SCRIPT ONCE ON EVERY HOST, with the same arguments except PROCESS_ID.
#
#   launch/multihost.sh COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID WORKDIR [CONFIG] [--config.FIELD=VALUE ...]
#   e.g. on host 0 of 2:  launch/multihost.sh 10.0.0.1:1234 2 0 /shared/runs/cifar_edm
#        on host 1 of 2:  launch/multihost.sh 10.0.0.1:1234 2 1 /shared/runs/cifar_edm
#
# Every host calls jax.distributed.initialize (config.distributed), sees all devices of all hosts in one
# Mesh('data'), reads only its own rows of each global batch (jaxdiff.data: process_index / process_count) and
# writes checkpoints to WORKDIR together with the others (orbax), so WORKDIR must be a filesystem all hosts share.
# training.batch_size is the GLOBAL batch: it must divide by the total device count.
# Under SLURM, Open MPI or on Cloud TPU, jax detects the coordinator and ids itself: pass only
# --config.distributed.initialize=True to `python -m jaxdiff.main` (e.g. `srun python -m jaxdiff.main ...`).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,6p' "$0"; exit 2
fi
coordinator=$1 num_processes=$2 process_id=$3 workdir=$4
shift 4
config=${1:-configs/cifar_edm.py}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
exec python -m jaxdiff.main --config="$config" --workdir="$workdir" \
  --config.distributed.initialize=True \
  --config.distributed.coordinator_address="$coordinator" \
  --config.distributed.num_processes="$num_processes" \
  --config.distributed.process_id="$process_id" \
  "$@"
