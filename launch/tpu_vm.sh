#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or several slices): create or reuse the TPU, copy this checkout to every worker,
# install, start `python -m vlp.train` on all workers at once, stream worker 0's log; Ctrl-C stops every worker.
#   launch/tpu_vm.sh --tpu my-v5e --zone us-west4-a --create --accelerator-type v5litepod-32 \
#     --config configs/clip.py:B/16 --workdir /mnt/runs/b16 -- --config.total_steps=20000
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --tpu NAME --zone ZONE --config FILE:ARG --workdir DIR [options] [-- TRAINER_ARGS...]

Runs `python -m vlp.train --config=FILE:ARG --workdir=DIR TRAINER_ARGS...` on every worker of a Cloud TPU VM slice.
Steps (gcloud compute tpus ...): [create unless it exists] -> copy pyproject.toml, README.md, vlp/, configs/, tools/,
launch/ to ~/vlp on every worker -> venv + `pip install -e . jax[tpu]==<jax version of pyproject.toml>` -> start the
trainer detached on all workers (each writes ~/vlp/train.log) -> stream worker 0's log until the run ends; the exit
status is worker 0's. JAX finds the layout itself (TPU metadata), so every worker runs the same command.

If this script loses its connection, the run goes on: --follow reattaches, --stop stops it. Ctrl-C stops it: the
trainers get SIGTERM (save a checkpoint and exit), and SIGKILL after --stop-grace-seconds.

The workdir must be storage that every worker sees at the same path (each process writes its own checkpoint shards):
e.g. a Cloud Storage bucket mounted with gcsfuse, or Filestore. A relative path lands on each worker's own disk and
only works for single-host slices.

Options:
  --tpu NAME                TPU VM name; with --node-count, the queued resource and the slices' name prefix
                            (slices are NAME-0, NAME-1, ...)
  --zone ZONE               zone of the TPU
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE   for --create (default v5litepod-32)
  --version VERSION         TPU runtime for --create (default v2-alpha-tpuv5-lite)
  --node-count N            multi-slice: N slices requested through a queued resource (`queued-resources create
                            --node-count N --node-prefix NAME`); the slices talk over DCN, and the mesh's first
                            axis, `data`, spans them (make it a multiple of N, e.g. mesh.shape=(N, -1, 1);
                            vlp/parallel/mesh.py builds the hybrid DCN x ICI mesh)
  --create                  create the TPU (or queued resource) unless it already exists; without it, it must exist
  --create-arg ARG          extra argument for the create command, repeatable (e.g. --create-arg=--spot,
                            --create-arg=--reserved)
  --internal-ip             reach the workers through internal IPs (from a VM in the same network)
  --skip-install            the workers already have ~/vlp/.venv with vlp installed: only copy and start
  --stop-grace-seconds S    Ctrl-C / --stop: SIGKILL the trainers S seconds after SIGTERM (default 120)
  --follow                  only stream worker 0's log of the run already going (with --node-count N for slices)
  --stop                    only stop the run already going (SIGTERM, then SIGKILL; --node-count N for slices)
  --dry-run                 print the commands, one per line, and run nothing
  -h, --help                this text
EOF
}

remote_dir=vlp # under each worker's home directory

# Shell-quotes each argument only where needed, so printed commands read naturally and paste back into a shell.
quote_args() {
  local out=() arg prefix
  for arg in "$@"; do
    prefix=""
    if [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then # --flag='value': quote the value only
      prefix=${BASH_REMATCH[1]}
      arg=${BASH_REMATCH[2]}
    fi
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%^-]*$ ]]; then
      out+=("$prefix$arg")
    else
      out+=("$prefix'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# ---- worker side: `bash launch/tpu_vm.sh --on-worker start|follow|stop ...`, run in ~/vlp through gcloud ssh ----

worker_start() {
  local pgid
  # A run still going from an earlier launch holds the TPU chips: refuse rather than fail obscurely in libtpu.
  if pgid=$(cat train.pid 2>/dev/null) && kill -0 -- "-$pgid" 2>/dev/null; then
    echo "error: a training run (process group $pgid) is still running on $(hostname); stop it with --stop" >&2
    exit 1
  fi
  rm -f train.exit train.trainer_pid
  # setsid: the run leads its own process group (it survives the ssh session, and `stop` can kill all of it,
  # grain workers included); the wrapper records the trainer's pid and, for `follow`, its exit status.
  setsid bash -c '.venv/bin/python -m vlp.train "$@" >train.log 2>&1 & echo $! >train.trainer_pid
    wait $!
    echo $? >train.exit' vlp-train "$@" </dev/null >/dev/null 2>&1 &
  echo $! >train.pid
  echo "$(hostname): started the trainer (process group $!), log ~/$remote_dir/train.log"
}

worker_follow() {
  local pid
  pid=$(cat train.pid) || { echo "error: no run was started on $(hostname) (no train.pid)" >&2; exit 1; }
  tail -n +1 -F --pid="$pid" train.log 2>/dev/null || true # ends when the run ends
  [[ -f train.exit ]] || { echo "the trainer on $(hostname) was killed (no exit status)" >&2; exit 137; }
  exit "$(cat train.exit)"
}

worker_stop() {
  local grace=$1 pgid trainer i
  pgid=$(cat train.pid 2>/dev/null) || exit 0
  kill -0 -- "-$pgid" 2>/dev/null || exit 0
  # SIGTERM to the trainer alone: it saves a checkpoint, stops its data workers and exits (for multi-process JAX it
  # is also the preemption notice). Only what is left after the grace period is killed, the whole process group.
  if trainer=$(cat train.trainer_pid 2>/dev/null); then
    kill -TERM "$trainer" 2>/dev/null || true
  else
    kill -TERM -- "-$pgid" 2>/dev/null || true
  fi
  for ((i = 0; i < grace; i++)); do
    kill -0 -- "-$pgid" 2>/dev/null || exit 0
    sleep 1
  done
  echo "$(hostname): the trainer did not stop within ${grace} s of SIGTERM; killing it" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

if [[ ${1:-} == --on-worker ]]; then
  case ${2:-} in
    start) shift 2 && worker_start "$@" ;;
    follow) worker_follow ;;
    stop) worker_stop "${3:-120}" ;;
    *) echo "error: --on-worker takes start, follow or stop, got '${2:-}'" >&2 && exit 2 ;;
  esac
  exit 0
fi

# ---- local side ----

tpu="" zone="" project="" accelerator_type=v5litepod-32 version=v2-alpha-tpuv5-lite node_count=""
config="" workdir="" create=0 internal_ip=0 skip_install=0 dry_run=0 mode=run stop_grace_seconds=120
create_args=() trainer_args=()

die() {
  echo "error: $*" >&2
  exit 2
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage && exit 0 ;;
    --tpu | --zone | --project | --accelerator-type | --version | --node-count | --config | --workdir | \
      --create-arg | --stop-grace-seconds)
      need_value "$@"
      case $1 in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) version=$2 ;;
        --node-count) node_count=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --create-arg) create_args+=("$2") ;;
        --stop-grace-seconds) stop_grace_seconds=$2 ;;
      esac
      shift 2
      ;;
    --tpu=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --node-count=* | --config=* | \
      --workdir=* | --create-arg=* | --stop-grace-seconds=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      ;;
    --create) create=1 && shift ;;
    --internal-ip) internal_ip=1 && shift ;;
    --skip-install) skip_install=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    --follow) mode=follow && shift ;;
    --stop) mode=stop && shift ;;
    --) shift && trainer_args=("$@") && break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done

[[ -n $tpu ]] || die "--tpu NAME is required (see --help)"
[[ -n $zone ]] || die "--zone ZONE is required (see --help)"
if [[ $mode == run ]]; then
  [[ -n $config ]] || die "--config FILE:ARG is required, e.g. --config configs/clip.py:B/16"
  [[ -n $workdir ]] || die "--workdir DIR is required: storage that every worker sees at the same path"
fi
[[ -z $node_count || $node_count =~ ^[1-9][0-9]*$ ]] || die "--node-count must be a positive number, got '$node_count'"
[[ $stop_grace_seconds =~ ^[0-9]+$ ]] || die "--stop-grace-seconds must be a number, got '$stop_grace_seconds'"

here=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^ *"jax>=\([0-9.]*\)",*$/\1/p' "$here/pyproject.toml")
[[ -n $jax_version ]] || die "cannot read the jax version from $here/pyproject.toml (expected a line \"jax>=X.Y.Z\")"

location=(--zone="$zone")
[[ -z $project ]] || location+=(--project="$project")
connect=()
((internal_ip)) && connect+=(--internal-ip)

# The slices: one TPU VM, or NAME-0..NAME-(N-1) from a queued resource.
nodes=("$tpu")
if [[ -n $node_count ]]; then
  nodes=()
  for ((i = 0; i < node_count; i++)); do nodes+=("$tpu-$i"); done
fi

run() { # prints the command under --dry-run, runs it otherwise
  if ((dry_run)); then
    quote_args "$@"
  else
    "$@"
  fi
}

run_shell() { # a shell line (with || or >), printed as it is under --dry-run
  if ((dry_run)); then
    printf '%s\n' "$1"
  else
    bash -c "$1"
  fi
}

on_all_slices() { # `on_all_slices ssh|scp ARGS...`: the same gcloud step on every slice, in parallel
  local kind=$1 node pids=() status=0 pid
  shift
  for node in "${nodes[@]}"; do
    if [[ $kind == ssh ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${location[@]}" "${connect[@]}" --worker=all --command="$1" &
    else
      run gcloud compute tpus tpu-vm scp "${location[@]}" "${connect[@]}" --worker=all --recurse "$@" \
        "$node:$remote_dir/" &
    fi
    pids+=("$!")
    ((dry_run)) && wait "$!" # keep the printed order
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

stop_run() {
  on_all_slices ssh "cd $remote_dir && bash launch/tpu_vm.sh --on-worker stop $stop_grace_seconds"
}

follow_run() {
  run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${location[@]}" "${connect[@]}" --worker=0 \
    --command="cd $remote_dir && bash launch/tpu_vm.sh --on-worker follow"
}

if [[ $mode == stop ]]; then
  stop_run
  exit
fi
if [[ $mode == follow ]]; then
  follow_run
  exit
fi

if ((create)); then
  if [[ -n $node_count ]]; then
    run_shell "$(quote_args gcloud compute tpus queued-resources describe "$tpu" "${location[@]}") >/dev/null \
2>&1 || $(quote_args gcloud compute tpus queued-resources create "$tpu" "${location[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$version" --node-count="$node_count" \
      --node-prefix="$tpu" "${create_args[@]}")"
  else
    run_shell "$(quote_args gcloud compute tpus tpu-vm describe "$tpu" "${location[@]}") >/dev/null 2>&1 || \
$(quote_args gcloud compute tpus tpu-vm create "$tpu" "${location[@]}" --accelerator-type="$accelerator_type" \
      --version="$version" "${create_args[@]}")"
  fi
fi
if [[ -n $node_count ]]; then # a queued resource is usable once ACTIVE
  state_cmd=(gcloud compute tpus queued-resources describe "$tpu" "${location[@]}" --format='value(state.state)')
  if ((dry_run)); then
    quote_args "${state_cmd[@]}"
  else
    until state=$("${state_cmd[@]}") && [[ $state == ACTIVE ]]; do
      case ${state:-} in
        FAILED | SUSPENDING | SUSPENDED) die "queued resource $tpu is $state: see \`gcloud compute tpus \
queued-resources describe $tpu --zone=$zone\`, delete it and try again" ;;
      esac
      echo "tpu_vm.sh: queued resource $tpu is ${state:-not found}; waiting for ACTIVE" >&2
      sleep 30
    done
  fi
fi

# Copy only what the install and the run need (not .venv, runs/, .git); replace the old copy's code directories.
cd "$here"
on_all_slices ssh "rm -rf $remote_dir/vlp $remote_dir/configs $remote_dir/tools $remote_dir/launch && mkdir -p \
$remote_dir"
on_all_slices scp pyproject.toml README.md vlp configs tools launch
if ((!skip_install)); then
  on_all_slices ssh "cd $remote_dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip \
install -q -e . \"jax[tpu]==$jax_version\""
fi

trap 'echo "tpu_vm.sh: interrupted; stopping the trainers on all workers" >&2; stop_run || true; exit 130' INT TERM
on_all_slices ssh "cd $remote_dir && bash launch/tpu_vm.sh --on-worker start $(quote_args --config="$config" \
  --workdir="$workdir" "${trainer_args[@]}")"
follow_run
