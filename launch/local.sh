#!/usr/bin/env bash
# Train on this machine's devices (CPU, one GPU or all local GPUs/TPU chips), resuming if the workdir has a checkpoint.
#   launch/local.sh configs/clip.py:tiny runs/local [--config.total_steps=300 ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:VARIANT] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m vlp.train --config="$config" --workdir="$workdir" "$@"
