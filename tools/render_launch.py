#!/usr/bin/env python
"""Render a Kubernetes JobSet manifest for one vlp training run on GKE (TPU slices or GPU nodes).

  # TPU: 2 slices of v5e 4x4 (4 hosts x 4 chips each) -> 8 pods, 32 chips
  python tools/render_launch.py --platform=tpu --tpu-type=v5litepod-16 --topology=4x4 --num-slices=2 \\
      --name=clip-b16 --image=IMAGE --config=configs/clip.py:B/16 --workdir=/mnt/runs/clip-b16 \\
      --gcs-bucket=BUCKET:/mnt/runs > jobset.yaml
  # GPU: 4 nodes x 8 GPUs, one pod (one JAX process) per node
  python tools/render_launch.py --platform=gpu --nodes=4 --gpus-per-node=8 \\
      --name=clip-b16 --image=IMAGE --config=configs/clip.py:B/16 --workdir=/mnt/runs/clip-b16 \\
      --pvc=shared-runs:/mnt/runs > jobset.yaml
  kubectl apply -f jobset.yaml

Nothing in the manifest is edited by hand: the pods run `python -m vlp.train --config=... --workdir=...` plus any
arguments after `--`. One pod per host (TPU) or per node (GPU); `replicas` x `parallelism` = the process count.
TPU pods need no layout settings (GKE's TPU webhook sets TPU_WORKER_HOSTNAMES / TPU_WORKER_ID; for several slices
the manifest adds MEGASCALE_* from the JobSet labels, and the mesh's `data` axis, the first, spans the slices over
DCN). GPU pods get VLP_COORDINATOR_ADDRESS (pod 0 through the JobSet's headless service), VLP_NUM_PROCESSES,
VLP_PROCESS_ID (the pod's completion index) and VLP_LOCAL_DEVICE_IDS=all (see vlp/parallel/distributed.py).

The config is loaded (with `--config.KEY=VALUE` arguments after `--` applied) and checked against the hardware: a mesh
without -1 must use exactly hosts x chips (nodes x GPUs) devices, the batch must divide by data x fsdp and by the
process count, and with several slices the data axis must be a multiple of the slice count. The workdir must be
storage every pod mounts at the same path (--gcs-bucket or --pvc); checkpoints are written by every process.
The equivalent `xpk workload create` command is printed to stderr (to stdout instead of the manifest with --xpk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

REPLICATED_JOB = {"tpu": "slice-job", "gpu": "workers"}
XPK_REPLICATED_JOB = "slice-job"  # the name xpk gives its replicated job, on TPU and GPU alike
CONTAINER = "vlp"

# XLA flags for multi-GPU training (MaxText's tuned A3 settings, scaling.md section 6); launch/slurm.sbatch sets the
# same list and tests/test_launch.py keeps the two equal and checks that the pinned jaxlib knows every flag.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=67108864",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
)
GPU_MEM_FRACTION = "0.85"  # of each GPU's memory for XLA's allocator (JAX's default is 0.75)


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """How GKE names a TPU generation and how its `--tpu-type` count maps to chips."""

    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    cores_per_chip: int  # v4/v5p types count TensorCores (v4-16 = 8 chips); v5e/v6e count chips
    single_host_max_chips: int  # slices up to this size run on one host; larger ones use 4-chip hosts


TPU_GENERATIONS = {
    "v4": TpuGeneration("tpu-v4-podslice", 2, 4),
    "v5p": TpuGeneration("tpu-v5p-slice", 2, 4),
    "v5litepod": TpuGeneration("tpu-v5-lite-podslice", 1, 8),
    "v6e": TpuGeneration("tpu-v6e-slice", 1, 8),
}
MULTI_HOST_CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The pods and devices of one launch."""

    platform: str
    num_slices: int  # TPU slices (GPU: 1)
    hosts_per_slice: int  # pods per slice (GPU: nodes)
    devices_per_host: int  # TPU chips or GPUs per pod
    node_selector: dict[str, str]
    resource: str  # google.com/tpu | nvidia.com/gpu

    @property
    def processes(self) -> int:
        return self.num_slices * self.hosts_per_slice

    @property
    def devices(self) -> int:
        return self.processes * self.devices_per_host


def tpu_hardware(tpu_type: str, topology: str, num_slices: int = 1, chips_per_host: int | None = None) -> Hardware:
    """`v5litepod-16`, `4x4` -> 4 hosts x 4 chips per slice; errors name the bad value and the valid ones."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", tpu_type)
    if not match:
        raise ValueError(f"--tpu-type={tpu_type!r} is not valid: expected <generation>-<size> with generation in "
                         f"{sorted(TPU_GENERATIONS)}, e.g. v5litepod-16, v5p-32, v6e-64, v4-16")
    generation = TPU_GENERATIONS[match.group(1)]
    count = int(match.group(2))
    if count % generation.cores_per_chip:
        raise ValueError(f"--tpu-type={tpu_type!r}: {match.group(1)} sizes count TensorCores "
                         f"({generation.cores_per_chip} per chip), so the size must be even")
    chips = count // generation.cores_per_chip
    if not re.fullmatch(r"\d+(x\d+){1,2}", topology):
        raise ValueError(f"--topology={topology!r} is not valid: expected e.g. 4x4 (v5e, v6e) or 2x2x4 (v4, v5p)")
    topology_chips = math.prod(int(d) for d in topology.split("x"))
    if topology_chips != chips:
        raise ValueError(f"--topology={topology} has {topology_chips} chips but --tpu-type={tpu_type} has {chips}; "
                         f"use a topology whose dimensions multiply to {chips}")
    if num_slices < 1:
        raise ValueError(f"--num-slices={num_slices} is not valid: expected >= 1")
    if chips_per_host is None:
        chips_per_host = chips if chips <= generation.single_host_max_chips else MULTI_HOST_CHIPS_PER_HOST
    if chips_per_host < 1 or chips % chips_per_host:
        raise ValueError(f"--chips-per-host={chips_per_host} does not divide the slice's {chips} chips")
    return Hardware("tpu", num_slices, chips // chips_per_host, chips_per_host,
                    {"cloud.google.com/gke-tpu-accelerator": generation.gke_accelerator,
                     "cloud.google.com/gke-tpu-topology": topology}, "google.com/tpu")


def gpu_hardware(nodes: int, gpus_per_node: int = 8, accelerator: str = "") -> Hardware:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    selector = {"cloud.google.com/gke-accelerator": accelerator} if accelerator else {}
    return Hardware("gpu", 1, nodes, gpus_per_node, selector, "nvidia.com/gpu")


def trainer_overrides(trainer_args: Sequence[str]) -> dict[str, str]:
    """`--config.batch_size=4096` arguments (as the trainer takes them) -> {"batch_size": "4096"}."""
    overrides = {}
    for arg in trainer_args:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            overrides[key] = value
    return overrides


def check_layout(config: Any, hw: Hardware) -> tuple[int, ...]:
    """The resolved (data, fsdp, tensor) mesh for `hw`; ValueError when the config does not fit the hardware."""
    from vlp.parallel.mesh import resolve_mesh_shape

    shape, num_devices = tuple(config.mesh.shape), config.mesh.num_devices
    where = (f"{hw.processes} {'hosts' if hw.platform == 'tpu' else 'nodes'} x {hw.devices_per_host} "
             f"{'chips' if hw.platform == 'tpu' else 'GPUs'} = {hw.devices} devices")
    if num_devices not in (-1, hw.devices):
        raise ValueError(f"config mesh.num_devices={num_devices} but the launch has {where}; set "
                         f"--config.mesh.num_devices=-1 (all) or change the hardware flags")
    if -1 not in shape and math.prod(shape) != hw.devices:
        raise ValueError(f"config mesh.shape={shape} uses {math.prod(shape)} devices but the launch has {where}; "
                         f"use a shape that multiplies to {hw.devices} (e.g. --config.mesh.shape='(-1, 1, 1)') or "
                         f"change the hardware flags")
    try:
        resolved = resolve_mesh_shape(shape, hw.devices)
    except ValueError as e:
        raise ValueError(f"config mesh.shape={shape} does not fit the launch ({where}): {e}") from None
    data, fsdp = resolved[0], resolved[1]
    if hw.num_slices > 1 and data % hw.num_slices:
        raise ValueError(f"mesh {resolved} has data={data}, which is not a multiple of --num-slices="
                         f"{hw.num_slices}: the data axis (first, DCN) spans the slices; use e.g. "
                         f"--config.mesh.shape='({hw.num_slices}, -1, 1)'")
    for divisor, what in ((data * fsdp, f"data x fsdp = {data * fsdp}"), (hw.processes, "the process count")):
        if config.batch_size % divisor:
            raise ValueError(f"config batch_size={config.batch_size} is not divisible by {what} ({where}); use a "
                             f"multiple of {divisor}")
    return resolved


def trainer_command(config_spec: str, workdir: str, trainer_args: Sequence[str]) -> list[str]:
    return ["python", "-m", "vlp.train", f"--config={config_spec}", f"--workdir={workdir}", *trainer_args]


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def pod_env(name: str, hw: Hardware, port: int) -> list[dict[str, Any]]:
    """The container's environment: what vlp.parallel.distributed and JAX's TPU detection read."""
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if hw.platform == "tpu":
        if hw.num_slices > 1:  # several slices talk over DCN through the megascale runtime
            env += [{"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB['tpu']}-0-0.{name}"},
                    _field_env("MEGASCALE_NUM_SLICES", "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']"),
                    _field_env("MEGASCALE_SLICE_ID", "metadata.labels['jobset.sigs.k8s.io/job-index']")]
        return env
    return env + [
        {"name": "VLP_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB['gpu']}-0-0.{name}:{port}"},
        {"name": "VLP_NUM_PROCESSES", "value": str(hw.processes)},
        _field_env("VLP_PROCESS_ID", "metadata.annotations['batch.kubernetes.io/job-completion-index']"),
        {"name": "VLP_LOCAL_DEVICE_IDS", "value": "all"},
        {"name": "XLA_FLAGS", "value": " ".join(GPU_XLA_FLAGS)},
        {"name": "XLA_PYTHON_CLIENT_MEM_FRACTION", "value": GPU_MEM_FRACTION},
    ]


def parse_mount(value: str, flag: str) -> tuple[str, str]:
    """`NAME:/mount/path` -> (NAME, /mount/path)."""
    source, sep, path = value.partition(":")
    if not sep or not source or not path.startswith("/"):
        raise ValueError(f"{flag}={value!r} is not valid: expected NAME:/absolute/mount/path")
    return source, path


def render_jobset(name: str, image: str, command: Sequence[str], hw: Hardware, *, port: int = 1234,
                  termination_grace_seconds: int = 300, max_restarts: int = 3, namespace: str | None = None,
                  gcs_bucket: str | None = None, pvc: str | None = None) -> dict[str, Any]:
    """The JobSet as a plain dict (dump it as YAML or JSON)."""
    rjob = REPLICATED_JOB[hw.platform]
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # grain workers, NCCL
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    pod_annotations: dict[str, str] = {}
    if gcs_bucket:
        bucket, path = parse_mount(gcs_bucket, "--gcs-bucket")
        pod_annotations["gke-gcsfuse/volumes"] = "true"
        volumes.append({"name": "runs", "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                                "volumeAttributes": {"bucketName": bucket}}})
        mounts.append({"name": "runs", "mountPath": path})
    if pvc:
        claim, path = parse_mount(pvc, "--pvc")
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "shared", "mountPath": path})
    container = {
        "name": CONTAINER,
        "image": image,
        "command": list(command),
        "env": pod_env(name, hw, port),
        "resources": {"limits": {hw.resource: hw.devices_per_host}},
        "volumeMounts": mounts,
    }
    if hw.platform == "gpu":
        container["ports"] = [{"containerPort": port, "name": "coordinator"}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM first (the trainer saves a checkpoint and exits), SIGKILL after this many seconds.
        "terminationGracePeriodSeconds": termination_grace_seconds,
        "nodeSelector": dict(hw.node_selector),
        "containers": [container],
        "volumes": volumes,
    }
    if hw.platform == "tpu":  # as GKE's multi-host TPU examples and xpk: DCN traffic on the host network
        pod_spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    pod_template: dict[str, Any] = {"metadata": {"annotations": pod_annotations}} if pod_annotations else {}
    pod_template["spec"] = pod_spec
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    if hw.platform == "tpu":  # each slice's Job gets a node pool of its own
        metadata["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            # Any failed pod restarts the whole set (up to maxRestarts); the run resumes from its last checkpoint.
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{
                "name": rjob,
                "replicas": hw.num_slices,
                "template": {"spec": {
                    "parallelism": hw.hosts_per_slice,
                    "completions": hw.hosts_per_slice,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": pod_template,
                }},
            }],
        },
    }


def xpk_command(name: str, image: str, command: Sequence[str], hw: Hardware, *, tpu_type: str = "",
                gpu_device_type: str = "", cluster: str = "CLUSTER", port: int = 1234,
                max_restarts: int = 3) -> str:
    """The `xpk workload create` command that launches the same run (xpk writes its own JobSet)."""
    args = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}", f"--docker-image={image}"]
    if hw.platform == "tpu":
        args += [f"--tpu-type={tpu_type}", f"--num-slices={hw.num_slices}"]
        shell = shlex.join(command)
    else:
        args += [f"--device-type={gpu_device_type}", f"--num-nodes={hw.processes}"]
        env = {"VLP_COORDINATOR_ADDRESS": f"{name}-{XPK_REPLICATED_JOB}-0-0.{name}:{port}",
               "VLP_NUM_PROCESSES": str(hw.processes), "VLP_LOCAL_DEVICE_IDS": "all",
               "XLA_FLAGS": " ".join(GPU_XLA_FLAGS), "XLA_PYTHON_CLIENT_MEM_FRACTION": GPU_MEM_FRACTION}
        shell = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command)
    args += [f"--max-restarts={max_restarts}", "--command", shell]
    return shlex.join(args)


def gpu_device_type(accelerator: str, gpus_per_node: int) -> str:
    """GKE accelerator label -> xpk --device-type: nvidia-h100-80gb, 8 -> h100-80gb-8."""
    short = accelerator.removeprefix("nvidia-")
    short = {"tesla-a100": "a100-40gb", "": "h100-80gb"}.get(short, short)
    return f"{short}-{gpus_per_node}"


def dump(manifest: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(manifest, indent=2) + "\n"
    import yaml  # PyYAML comes with flax / ml_collections

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)


def _name(value: str) -> str:
    # Pod hostnames are <name>-<replicated job>-<job index>-<pod index> and must stay within 63 characters.
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid JobSet name: use 1-40 lowercase letters, digits "
                                         f"and '-', starting with a letter and not ending with '-'")
    return value


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = []
    if "--" in argv:
        at = argv.index("--")
        argv, trainer_args = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --platform {tpu,gpu} --name NAME --image IMAGE --config FILE:ARG "
                                      "--workdir DIR [options] [-- TRAINER_ARGS...]")
    p.add_argument("--platform", required=True, choices=("tpu", "gpu"))
    p.add_argument("--name", required=True, type=_name, help="JobSet name (also the pods' DNS subdomain)")
    p.add_argument("--image", required=True, help="container image with vlp installed (launch/docker/)")
    p.add_argument("--config", required=True, help="config file[:arg], as the image sees it, e.g. configs/clip.py:B/16")
    p.add_argument("--workdir", required=True, help="run directory on storage every pod mounts at the same path")
    tpu = p.add_argument_group("TPU (--platform=tpu)")
    tpu.add_argument("--tpu-type", help="slice type, e.g. v5litepod-16, v5p-32, v6e-64, v4-16")
    tpu.add_argument("--topology", help="slice topology, e.g. 4x4 (v5e/v6e) or 2x2x4 (v4/v5p)")
    tpu.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (default 1)")
    tpu.add_argument("--chips-per-host", type=int, default=None,
                     help="default: the whole slice for <= 8 chips (v5e/v6e) or <= 4 (v4/v5p), else 4")
    gpu = p.add_argument_group("GPU (--platform=gpu)")
    gpu.add_argument("--nodes", type=int, help="GPU nodes, one pod (one JAX process) each")
    gpu.add_argument("--gpus-per-node", type=int, default=8)
    gpu.add_argument("--gpu-accelerator", default="nvidia-h100-80gb",
                     help="node label cloud.google.com/gke-accelerator ('' for no node selector)")
    gpu.add_argument("--port", type=int, default=1234, help="coordinator port on pod 0 (default 1234)")
    p.add_argument("--termination-grace-seconds", type=int, default=300,
                   help="time between SIGTERM and SIGKILL, enough for a final checkpoint (default 300)")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure (default 3)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--gcs-bucket", metavar="BUCKET:/MOUNT", help="mount a Cloud Storage bucket with gcsfuse")
    p.add_argument("--pvc", metavar="CLAIM:/MOUNT", help="mount a PersistentVolumeClaim (e.g. Filestore)")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.add_argument("--out", default=None, help="write the manifest here instead of stdout")
    p.add_argument("--xpk", action="store_true", help="print only the equivalent xpk command, to stdout")
    p.add_argument("--cluster", default="CLUSTER", help="GKE cluster name for the xpk command")
    args = p.parse_args(argv)
    if args.platform == "tpu" and not (args.tpu_type and args.topology):
        p.error("--platform=tpu needs --tpu-type and --topology (e.g. --tpu-type=v5litepod-16 --topology=4x4)")
    if args.platform == "gpu" and not args.nodes:
        p.error("--platform=gpu needs --nodes (e.g. --nodes=2 --gpus-per-node=8)")
    return args, trainer_args


def main(argv: Sequence[str] | None = None) -> int:
    args, trainer_args = parse_args(argv)
    from vlp import config as vlp_config

    try:
        if args.platform == "tpu":
            hw = tpu_hardware(args.tpu_type, args.topology, args.num_slices, args.chips_per_host)
        else:
            hw = gpu_hardware(args.nodes, args.gpus_per_node, args.gpu_accelerator)
        config = vlp_config.load_config_file(args.config)
        vlp_config.apply_overrides(config, trainer_overrides(trainer_args))
        mesh = check_layout(config, hw)
        command = trainer_command(args.config, args.workdir, trainer_args)
        manifest = render_jobset(args.name, args.image, command, hw, port=args.port,
                                 termination_grace_seconds=args.termination_grace_seconds,
                                 max_restarts=args.max_restarts, namespace=args.namespace,
                                 gcs_bucket=args.gcs_bucket, pvc=args.pvc)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"render_launch: error: {e}", file=sys.stderr)
        return 2
    xpk = xpk_command(args.name, args.image, command, hw, tpu_type=args.tpu_type or "",
                      gpu_device_type=gpu_device_type(args.gpu_accelerator, args.gpus_per_node),
                      cluster=args.cluster, port=args.port, max_restarts=args.max_restarts)
    if args.xpk:
        print(xpk)
        return 0
    text = dump(manifest, args.format)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    print(f"# {hw.processes} pods x {hw.devices_per_host} devices = {hw.devices}, mesh (data, fsdp, tensor) = "
          f"{mesh}\n# equivalent xpk command:\n{xpk}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
