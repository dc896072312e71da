"""Multi-process JAX: one `initialize()` call at the start of a run, before anything touches a device.

A multi-host run is one process per host (TPU VM, GPU node) or per GPU (SLURM's default), all running the same
program; `jax.distributed` connects them through a coordinator service on process 0. `initialize()` works out from
the environment whether this process is one of several and, if so, starts `jax.distributed`. A plain single process
(a laptop, one GPU box, a single-host TPU VM) is a no-op. It must run before any device use (`jax.devices()`, an
array, a jit call): JAX fixes its device list when the backend starts.

Where the process layout comes from (first match wins):
1. Explicit launch (launch/cpu_multiprocess.sh, a GKE Job without pod-list permission, any scheduler):
     VLP_COORDINATOR_ADDRESS  host:port of process 0, the same on every process (JAX_COORDINATOR_ADDRESS also works)
     VLP_NUM_PROCESSES        number of processes N
     VLP_PROCESS_ID           0..N-1; if unset, JOB_COMPLETION_INDEX (Kubernetes indexed Job / JobSet pod index)
2. A cluster JAX recognises (`jax._src.clusters`, reused as is): Cloud TPU VM pod slices and multislice (TPU
   metadata, MEGASCALE_*), TPUs on GKE (TPU_WORKER_HOSTNAMES), SLURM (`srun`, SLURM_NTASKS > 1), Open MPI
   (`mpirun`), Kubernetes indexed Jobs / JobSets (JOB_COMPLETION_INDEX; needs the `kubernetes` package and a
   service account that may list pods). Only layouts with more than one process start `jax.distributed`.
3. Otherwise: one process, nothing to do.

Other settings (environment variables; keyword arguments of `initialize` take precedence):
  VLP_DISTRIBUTED          auto (default) | off (never start jax.distributed) | on (always; JAX detects the layout,
                           e.g. under a scheduler vlp does not probe) | a JAX detection method to force (slurm,
                           ompi, mpi4py, gcetpu, gketpu)
  VLP_LOCAL_DEVICE_IDS     accelerators this process drives: "0,1,2,3" or "all". Under SLURM JAX starts one process
                           per GPU (device = SLURM_LOCALID); with one task per node set "all".
  VLP_INIT_TIMEOUT_SECONDS       how long processes wait for each other at start (default 300)
  VLP_HEARTBEAT_TIMEOUT_SECONDS  a process silent this long is declared dead (default 100)
  VLP_SHUTDOWN_TIMEOUT_SECONDS   how long a finished or failed process waits for the others at exit (default 300)
  JAX_NUM_CPU_DEVICES      CPU devices per process (tests, launch/cpu_multiprocess.sh); CPU collectives use gloo,
                           JAX's default (JAX_CPU_COLLECTIVES_IMPLEMENTATION).

When a process dies (measured with jax 0.10.2, 2 CPU processes, gloo): the coordination service notices the missing
heartbeats after about VLP_HEARTBEAT_TIMEOUT_SECONDS and aborts every other process (exit status 134, SIGABRT), even
one blocked inside a collective, with "Terminating process because the JAX distributed service detected fatal
errors ... The following tasks are unhealthy (stopped sending heartbeats): <process ids>". If process 0 (the
coordinator) dies, the others abort within a second ("Failed to send RPC to coordination service"). A process that
fails with a Python error waits VLP_SHUTDOWN_TIMEOUT_SECONDS at exit for the others, then all abort. Nothing hangs
forever after a death, but a process that is alive and never reaches a collective (a hang, not a crash) blocks its
peers indefinitely: heartbeats continue and gloo has no timeout. SIGTERM does not stop a multi-process run: JAX
treats it as a preemption notice; stop processes with SIGKILL (schedulers do, after their grace period).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Who this process is: `source` is "single", "explicit" or the JAX cluster that supplied the layout."""

    process_id: int
    num_processes: int
    source: str
    coordinator_address: str | None = None


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds; JAX's defaults."""

    init_seconds: int = 300
    heartbeat_seconds: int = 100
    shutdown_seconds: int = 300


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """The arguments for `jax.distributed.initialize`; None fields are left to JAX's cluster detection."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cluster_detection_method: str | None = None


def _int_env(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={raw!r} is not valid: expected an integer >= {minimum}")
    return value


def parse_local_device_ids(raw: str, name: str = "VLP_LOCAL_DEVICE_IDS") -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); "all" -> () which `jax.distributed.initialize` reads as: do not restrict devices
    (it also stops JAX's SLURM/Open MPI default of one device per process)."""
    raw = raw.strip()
    if raw.lower() == "all":
        return ()
    try:
        ids = tuple(int(x) for x in raw.split(","))
    except ValueError:
        ids = ()
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{name}={raw!r} is not valid: expected 'all' or distinct device ids such as '0,1,2,3'")
    return ids


def timeouts_from_env(environ: Mapping[str, str] | None = None) -> Timeouts:
    environ = os.environ if environ is None else environ
    values = {"init_seconds": _int_env(environ, "VLP_INIT_TIMEOUT_SECONDS", 1),
              "heartbeat_seconds": _int_env(environ, "VLP_HEARTBEAT_TIMEOUT_SECONDS", 1),
              "shutdown_seconds": _int_env(environ, "VLP_SHUTDOWN_TIMEOUT_SECONDS", 1)}
    return Timeouts(**{k: v for k, v in values.items() if v is not None})


def _detected_cluster(environ: Mapping[str, str]):
    """The JAX cluster environment this process runs in (JAX's own list and order), or None."""
    from jax._src import clusters  # private, but the same detection jax.distributed.initialize() runs

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        # Every Kubernetes pod has KUBERNETES_SERVICE_HOST; only an indexed Job is a multi-process launch.
        if env is clusters.K8sCluster and "JOB_COMPLETION_INDEX" not in environ:
            continue
        if env.is_env_present():
            return env
    return None


def plan_launch(environ: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
                num_processes: int | None = None, process_id: int | None = None,
                local_device_ids: Sequence[int] | str | None = None) -> LaunchPlan | None:
    """What `initialize` would do: the `jax.distributed.initialize` arguments, or None for a single process.

    Keyword arguments override the VLP_* variables of `environ` (default os.environ); JAX's cluster detection always
    reads os.environ.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get("VLP_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode == "off":
        return None
    if mode not in MODES:  # the name of a JAX detection method
        from jax._src import clusters

        methods = sorted({env.name for env in clusters.ClusterEnv._cluster_types if env.name} - {"tpu"})
        if mode not in methods:
            raise ValueError(f"VLP_DISTRIBUTED={mode!r} is not valid: expected one of {list(MODES) + methods}")
    if isinstance(local_device_ids, str):
        local_device_ids = parse_local_device_ids(local_device_ids, "local_device_ids")
    elif local_device_ids is not None:
        local_device_ids = tuple(int(i) for i in local_device_ids)
    elif environ.get("VLP_LOCAL_DEVICE_IDS", "").strip():
        local_device_ids = parse_local_device_ids(environ["VLP_LOCAL_DEVICE_IDS"])

    coordinator_address = coordinator_address or environ.get("VLP_COORDINATOR_ADDRESS", "").strip() or None
    if num_processes is None:
        num_processes = _int_env(environ, "VLP_NUM_PROCESSES", 1)
    if coordinator_address or num_processes is not None:
        return _explicit_plan(environ, coordinator_address, num_processes, process_id, local_device_ids)

    if mode not in MODES:
        return LaunchPlan(mode, local_device_ids=local_device_ids, cluster_detection_method=mode)
    if mode == "on":
        return LaunchPlan("jax auto-detection", local_device_ids=local_device_ids)
    cluster = _detected_cluster(environ)
    if cluster is None:
        if environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ValueError("JAX_COORDINATOR_ADDRESS is set but no process count was found: also set "
                             "VLP_NUM_PROCESSES and VLP_PROCESS_ID (or unset JAX_COORDINATOR_ADDRESS for one process)")
        return None
    if cluster.get_process_count() <= 1:
        return None
    return LaunchPlan(getattr(cluster, "name", "") or cluster.__name__, local_device_ids=local_device_ids)


def _explicit_plan(environ: Mapping[str, str], coordinator_address: str | None, num_processes: int | None,
                   process_id: int | None, local_device_ids: tuple[int, ...] | None) -> LaunchPlan | None:
    coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    if num_processes is None:
        raise ValueError(f"a coordinator address ({coordinator_address}) is set but VLP_NUM_PROCESSES is not: set it "
                         f"to the number of processes on every process")
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} is not valid: expected >= 1")
    if num_processes == 1:
        return None
    if not coordinator_address or ":" not in coordinator_address:
        raise ValueError(f"VLP_NUM_PROCESSES={num_processes} needs VLP_COORDINATOR_ADDRESS=host:port (process 0's "
                         f"address and a free port, the same on every process); got {coordinator_address!r}")
    if process_id is None:
        process_id = _int_env(environ, "VLP_PROCESS_ID", 0)
    if process_id is None:
        process_id = _int_env(environ, "JOB_COMPLETION_INDEX", 0)
    if process_id is None:
        raise ValueError(f"VLP_NUM_PROCESSES={num_processes} but this process has no id: set VLP_PROCESS_ID to "
                         f"0..{num_processes - 1} (or run as a Kubernetes indexed Job, which sets "
                         f"JOB_COMPLETION_INDEX)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not valid for {num_processes} processes: expected "
                         f"0..{num_processes - 1}")
    # 'deactivate': what the variables say is the whole layout; no cluster detection second-guesses it.
    return LaunchPlan("explicit", coordinator_address, num_processes, process_id, local_device_ids,
                      cluster_detection_method="deactivate")


def _backends_initialized() -> bool:
    from jax._src import xla_bridge  # no public query for this

    return xla_bridge.backends_are_initialized()


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | str | None = None,
               num_cpu_devices: int | None = None, timeouts: Timeouts | None = None,
               environ: Mapping[str, str] | None = None) -> DistributedInfo:
    """Starts multi-process JAX when the environment (or the arguments) describe several processes.

    Call once, first thing in the program, before any device use. A single process is left alone. Calling it again
    after a successful start returns the same description. `num_cpu_devices` sets the CPU devices per process
    (like JAX_NUM_CPU_DEVICES). Raises ValueError for inconsistent settings and RuntimeError when JAX devices are
    already in use.
    """
    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    if jax.distributed.is_initialized():
        return DistributedInfo(jax.process_index(), jax.process_count(), "already initialised")
    plan = plan_launch(environ, coordinator_address=coordinator_address, num_processes=num_processes,
                       process_id=process_id, local_device_ids=local_device_ids)
    if plan is None:
        return DistributedInfo(0, 1, "single")
    where = f"{plan.num_processes or 'several'} processes ({plan.source})"
    if _backends_initialized():
        raise RuntimeError(f"vlp.parallel.distributed.initialize() was asked to join {where}, but JAX devices are "
                           f"already in use in this process; call it first, before jax.devices(), any array or jit")
    timeouts = timeouts or timeouts_from_env(environ)
    local_ids = None if plan.local_device_ids is None else list(plan.local_device_ids)
    jax.distributed.initialize(
        coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
        process_id=plan.process_id, local_device_ids=local_ids,
        cluster_detection_method=plan.cluster_detection_method,
        initialization_timeout=timeouts.init_seconds, heartbeat_timeout_seconds=timeouts.heartbeat_seconds,
        shutdown_timeout_seconds=timeouts.shutdown_seconds)
    from jax._src.distributed import global_state  # the address JAX settled on (detected clusters choose one)

    info = DistributedInfo(jax.process_index(), jax.process_count(), plan.source, global_state.coordinator_address)
    log.info("process %d of %d joined (%s, coordinator %s); a process silent for %d s is declared dead",
             info.process_id, info.num_processes, info.source, info.coordinator_address, timeouts.heartbeat_seconds)
    return info
