#!/usr/bin/env bash
# N jaxdiff processes on this machine, each with its own CPU devices, joined by jax.distributed over 127.0.0.1:
# a multi-host run to try out on one machine (tests/test_multiprocess.py runs it).
#
#   launch/local_multiprocess.sh NUM_PROCESSES WORKDIR [CONFIG] [--mode=MODE] [--config.FIELD=VALUE ...]
#   e.g.  launch/local_multiprocess.sh 2 /tmp/toy2d_2proc configs/toy2d_edm.py --config.training.total_images=25600
#
# CONFIG defaults to configs/toy2d_edm.py. Environment: DEVICES_PER_PROCESS (CPU devices of each process, default 4),
# PORT (the coordinator's port, default a free one), PYTHON (default python). Process 0 prints here, process i > 0
# to WORKDIR/logs/process_i.log. training.batch_size (the global batch) must divide by NUM_PROCESSES *
# DEVICES_PER_PROCESS. When one process fails the others are stopped; the exit status is the failed one's. Ctrl-C
# or SIGTERM: every process saves the step they agree on and exits, and the script waits for them.
set -euo pipefail
if [ $# -lt 2 ]; then
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"  # the comment above
  exit 2
fi
num_processes=$1 workdir=$2
shift 2
case $num_processes in
  '' | *[!0-9]* | 0) echo "NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=$repo/configs/toy2d_edm.py
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
  config=$1
  shift
fi
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}  # this checkout's jaxdiff, installed or not
mkdir -p "$workdir/logs"

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all EXIT                                 # one process failed: stop the others
trap 'trap - EXIT; stop_all; wait; exit 130' INT TERM   # SIGTERM to each: they agree on a step, save it, exit
for ((i = 0; i < num_processes; i++)); do
  command=(env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices" "$python" -m jaxdiff.main
           --config="$config" --workdir="$workdir"
           --config.distributed.initialize=True --config.distributed.coordinator_address="127.0.0.1:$port"
           --config.distributed.num_processes="$num_processes" --config.distributed.process_id="$i" "$@")
  if ((i == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"$workdir/logs/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "started $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port (logs of 1..: $workdir/logs)" >&2
for ((i = 0; i < num_processes; i++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    echo "a process exited with status $status; stopping the others (logs: $workdir/logs)" >&2
    exit "$status"
  fi
done
