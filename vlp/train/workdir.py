"""The run directory: creation with clear errors, the resolved config and the provenance record."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections

from vlp import config as vlp_config

PACKAGES = ("vlp", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece",
            "ml_collections", "tensorboardX", "safetensors")


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates the workdir (and parents); names the offending path when that is impossible."""
    path = Path(workdir)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot create workdir {path}: {parent} exists and is a regular file, "
                                     f"not a directory; choose another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create workdir {path}: {e.strerror}; choose another --workdir") from e
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "command": sys.argv,
    }


def write_run_files(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes config.json and provenance.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    (workdir / "config.json").write_text(vlp_config.to_json(config))
    (workdir / "provenance.json").write_text(json.dumps(provenance(), indent=2))


def load_config(workdir: str | Path, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """The run's resolved config from `<workdir>/config.json`, with optional dotted-key overrides."""
    config = vlp_config.load_json(Path(workdir) / "config.json")
    if overrides:
        vlp_config.apply_overrides(config, overrides)
    return config
