#!/usr/bin/env bash
# N `python -m vlp.train` processes on this machine's CPU, joined through a local coordinator: a multi-host run in
# miniature (tests, debugging multi-process code without a cluster).
#   launch/cpu_multiprocess.sh 2 --config=configs/clip.py:tiny --workdir=runs/mp --config.total_steps=20
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/cpu_multiprocess.sh N [ARGS...]

Starts N processes of `python -m vlp.train ARGS...` on this machine, each with JAX_NUM_CPU_DEVICES CPU devices
(default 2), joined through a coordinator on 127.0.0.1 and a free port (gloo collectives). Output lines are prefixed
with the process rank. If any process exits non-zero, the others are killed (SIGKILL) and the launcher exits with
that status; Ctrl-C kills all of them (the last complete checkpoint is kept).

Environment: JAX_NUM_CPU_DEVICES (devices per process, default 2), VLP_COORDINATOR_PORT (default: a free port),
PYTHON (default: .venv/bin/python), VLP_HEARTBEAT_TIMEOUT_SECONDS and the other settings in
vlp/parallel/distributed.py. Needs bash >= 5.1.
EOF
}

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
if [[ $1 == -h || $1 == --help ]]; then
  usage
  exit 0
fi
if ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N must be a positive number of processes, got '$1' (see --help)" >&2
  exit 2
fi
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "error: bash >= 5.1 is needed (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi
num_processes=$1
shift

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[[ -x $python ]] || python=python3
port=${VLP_COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-2}
export VLP_COORDINATOR_ADDRESS=127.0.0.1:$port
export VLP_NUM_PROCESSES=$num_processes
export PYTHONUNBUFFERED=1 # a rank that is aborted must not lose its last lines

declare -A rank_of=()
pids=()
for ((rank = 0; rank < num_processes; rank++)); do
  # setsid: each rank leads its own process group, so stopping it also stops its children (grain workers).
  VLP_PROCESS_ID=$rank setsid "$python" -m vlp.train "$@" \
    > >(sed -u "s/^/[$rank] /") 2> >(sed -u "s/^/[$rank] /" >&2) &
  rank_of[$!]=$rank
  pids+=("$!")
done

stop_all() {
  # SIGKILL: a multi-process JAX program treats SIGTERM as a preemption notice and keeps running.
  local pid
  for pid in "${!rank_of[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap 'echo "launcher: interrupted; killing all ranks" >&2; stop_all; exit 130' INT TERM

echo "launcher: $num_processes processes x $JAX_NUM_CPU_DEVICES CPU devices, coordinator $VLP_COORDINATOR_ADDRESS" >&2
while ((${#rank_of[@]})); do
  status=0
  wait -n -p finished "${!rank_of[@]}" || status=$?
  rank=${rank_of[$finished]}
  unset "rank_of[$finished]"
  if ((status != 0)); then
    reason="status $status"
    ((status > 128)) && reason+=" (signal $(kill -l $((status - 128)) 2>/dev/null || echo $((status - 128))))"
    echo "launcher: rank $rank exited with $reason; killing the other ranks" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
wait || true # let the output prefixers drain
echo "launcher: all $num_processes ranks finished" >&2
