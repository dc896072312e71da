"""The run directory: creation with clear errors, the resolved config and the provenance record."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from vlp import config as vlp_config
from vlp.train.paths import is_local, write_text_atomic

# Config keys that change which examples the training stream yields, or what each one becomes. A checkpoint saves
# the data position as a batch index of this stream, so resuming with any of them changed would silently train on
# other data than the uninterrupted run (or repeat/skip examples). Keys that only change how fast the stream is
# read (data.worker_count, data.read_threads), how long the run is (total_steps) or the optimisation, logging,
# evals and checkpoints are not listed: a resume may change them. `objective` and the patch size enter too: the
# objective's example transform (captions, MIM masks on the patch grid) is part of the stream.
DATA_STREAM_KEYS = (
    "objective", "seed", "batch_size",
    "data.source", "data.mixture", "data.train_split", "data.image_size", "data.random_crop_scale",
    "data.random_flip", "data.train_caption", "data.synthetic_caption_prob", "data.max_text_len", "data.tokenizer",
    "mim.mask_kind", "mim.mask_ratio", "mim.min_block", "mim.masked_image_fraction",
    "model.image.patch_size", "model.image.variant",
)
CONFIG_HISTORY = "config_history"  # <workdir>/config_history/<n>_<UTC time>.json: the config of every start

PACKAGES = ("vlp", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece",
            "ml_collections", "tensorboardX", "safetensors")


def prepare_workdir(workdir: epath.PathLike) -> epath.Path:
    """Creates the workdir (and parents); names the offending path when that is impossible. A URL (`gs://...`) is
    used as given: an object store has no directories to create and no file that could stand in the way."""
    path = epath.Path(workdir)
    for parent in [path, *path.parents] if is_local(path) else []:
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


_ABSENT = object()


def _dotted(values: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _ABSENT
        values = values[part]
    return values


def has_checkpoint(workdir: epath.PathLike) -> bool:
    """Whether `<workdir>/checkpoints` holds a finished step, i.e. whether this start is a resume. Orbax finishes a
    local step by renaming its temporary directory; on an object store it writes the step in place and finishes it
    with commit_success.txt."""
    checkpoints = epath.Path(workdir) / "checkpoints"
    return checkpoints.is_dir() and any(
        p.name.isdigit() and p.is_dir() and (is_local(p) or (p / "commit_success.txt").exists())
        for p in checkpoints.iterdir())


def changed_data_keys(saved: dict, config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each DATA_STREAM_KEYS entry that differs, compared as JSON values."""
    from vlp.objectives import get_objective
    from vlp.objectives.masked_image import MaskedImageMixin

    new = json.loads(vlp_config.to_json(config))
    masked = issubclass(get_objective(config.objective), MaskedImageMixin)
    changed = []
    for key in DATA_STREAM_KEYS:
        if key.startswith("mim.") and not masked:  # mask settings reach the stream only of masked-image objectives
            continue
        old_value, new_value = _dotted(saved, key), _dotted(new, key)
        if old_value is not _ABSENT and old_value != new_value:  # absent: a key the saved config predates
            changed.append((key, old_value, new_value))
    return changed


def check_resume_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """On a resume (a checkpoint and a saved config.json), refuses a config whose data stream differs from the saved
    one unless `allow_data_change`; names each changed key with its old and new value. Every process checks, so all
    of them stop together: process 0 rewrites config.json (write_run_files) only after its own check passed, and
    then with a config that passes the check too."""
    saved_path = epath.Path(workdir) / "config.json"
    if not saved_path.is_file() or not has_checkpoint(workdir):
        return
    changed = changed_data_keys(json.loads(saved_path.read_text()), config)
    if not changed:
        return
    listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
    if config.allow_data_change:
        logging.warning("resuming %s with a changed data stream (allow_data_change=True): %s; the saved data "
                        "position is reinterpreted in the new stream", workdir, listing)
        return
    raise ValueError(
        f"cannot resume {workdir} with a changed data stream: {listing}. The checkpoint's data position is a batch "
        f"index of the saved config's stream ({saved_path}); with these changes the run would silently see other "
        f"examples. Restore the saved value(s), use a new --workdir, or resume anyway with "
        f"--config.allow_data_change=True")


def write_run_files(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes config.json (the newest config), config_history/<n>_<UTC time>.json (one per start, so a resumed run
    keeps what every segment ran with) and provenance.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    text = vlp_config.to_json(config)
    history = workdir / CONFIG_HISTORY
    history.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name.split("_", 1)[0]) for p in history.glob("*_*.json")
                      if p.name.split("_", 1)[0].isdigit()), default=0)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    write_text_atomic(history / f"{number:04d}_{stamp}.json", text)
    write_text_atomic(workdir / "config.json", text)
    write_text_atomic(workdir / "provenance.json", json.dumps(provenance(), indent=2))


def load_config(workdir: epath.PathLike, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """The run's resolved config from `<workdir>/config.json`, with optional dotted-key overrides."""
    config = vlp_config.load_json(epath.Path(workdir) / "config.json")
    if overrides:
        vlp_config.apply_overrides(config, overrides)
    return config
