"""Per-record cluster labels (MLCD): a side file written by tools/cluster.py and read by the training stream.

Format: `<path>` is a `.npy` int32 array [N, k] whose row i holds the k nearest k-means centres (nearest first) of
record i of the clustered source (its `index` field: the record's position in the source), and `<path>.json`
describes it ({"num_centres", "positives", "num_records", "source", "split", "checkpoint", ...}). The array is
memory-mapped, so a 400M x 10 file is not read into each worker's memory.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import numpy as np
from etils import epath

LABELS_KEY = "cluster_labels"


def write_cluster_labels(path: str, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Writes labels [N, k] int32 and `<path>.json` (meta plus num_records, positives)."""
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 2:
        raise ValueError(f"cluster labels must be [N, k], got shape {labels.shape}")
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.save(f, labels)
    meta = dict(meta, num_records=int(labels.shape[0]), positives=int(labels.shape[1]))
    epath.Path(f"{path}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_cluster_meta(path: str) -> dict[str, Any]:
    meta_path = epath.Path(f"{path}.json")
    if not meta_path.exists():
        raise FileNotFoundError(f"no cluster-label file {path!r} (its description {meta_path} is missing); write it "
                                f"with tools/cluster.py")
    return json.loads(meta_path.read_text())


@dataclasses.dataclass
class AddClusterLabels(grain.transforms.Map):
    """Runs `inner` and adds `LABELS_KEY`: int32 [positives], the first `positives` centres of the record's row
    (looked up by the record's `index`). Picklable: each worker maps the file on first use."""

    inner: grain.transforms.Map
    path: str
    positives: int

    def __post_init__(self):
        meta = read_cluster_meta(self.path)
        if not 1 <= self.positives <= meta["positives"]:
            raise ValueError(f"mlcd.positives={self.positives}, but {self.path} holds {meta['positives']} labels per "
                             f"record; use 1..{meta['positives']} or re-run tools/cluster.py with --positives")
        self._labels = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_labels"} | {"_labels": None}

    def map(self, example: dict) -> dict:
        if self._labels is None:
            self._labels = np.load(self.path, mmap_mode="r")
        index = int(example["index"])
        if not 0 <= index < self._labels.shape[0]:
            raise IndexError(f"record index {index} has no row in {self.path} ({self._labels.shape[0]} rows): the "
                             f"labels were made for a different source or split")
        out = self.inner.map(example)
        out[LABELS_KEY] = np.asarray(self._labels[index, :self.positives], np.int32)
        return out
