#!/usr/bin/env bash
# Train on this machine's devices (CPU, one GPU or all local GPUs/TPU chips), resuming if the workdir has a checkpoint.
#   launch/local.sh configs/clip.py:tiny runs/local [--config.total_steps=300 ...]
set -euo pipefail
usage="usage: $0 CONFIG[:VARIANT] WORKDIR [--config.KEY=VALUE ...]
Runs python -m vlp.train on this machine; running it again resumes from WORKDIR's newest checkpoint.
Exit codes: 0 done, 75 preempted (checkpoint saved: run again), 76 a step hung (watchdog: run again),
65 non-finite loss, 74 checkpoint write failed."
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  echo "$usage"
  exit 0
fi
if [[ $# -lt 2 ]]; then
  echo "$usage" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m vlp.train --config="$config" --workdir="$workdir" "$@"
