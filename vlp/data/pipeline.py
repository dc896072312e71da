"""grain input pipelines: the training stream (sharded per process, shuffled, batched, checkpointable) and the
fixed evaluation sets."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from vlp.data.augment import resize_center_crop
from vlp.data.transforms import SKIPPED_KEY, normalize_image

log = logging.getLogger(__name__)

# Every training record carries how many unreadable records were skipped to produce it (SKIPPED_KEY); batched, the
# train step sums it into the `skipped_bad_records` metric (this works across grain worker processes and hosts).
MAX_CONSECUTIVE_BAD_RECORDS = 100


class SkippingReader:
    """A random-access source whose unreadable records are replaced by the next readable one, and counted.

    Replacement is a pure function of the index, so a resumed run reads exactly what the uninterrupted one did.
    """

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        errors = []
        for offset in range(MAX_CONSECUTIVE_BAD_RECORDS):
            candidate = (index + offset) % len(self.source)
            try:
                record = dict(self.source[candidate])
            except Exception as e:  # noqa: BLE001 - any unreadable record (decode error, I/O) is skipped
                errors.append(f"record {candidate}: {type(e).__name__}: {e}")
                log.warning("skipping unreadable training record %d (%s: %s)", candidate, type(e).__name__, e)
                continue
            record[SKIPPED_KEY] = np.int32(offset)
            return record
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD_RECORDS} consecutive training records are unreadable, from "
                           f"index {index}; is the data source intact? first errors: {errors[:3]}")


@dataclasses.dataclass(frozen=True)
class TrainStreamSpec:
    global_batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0
    read_threads: int = 4


@dataclasses.dataclass(frozen=True)
class SourceStream:
    """One source of a training mixture: its weight and its per-record image transform (e.g. a random resized
    crop to the training size; None keeps the source's images, which must then all have the training size)."""

    source: Any
    weight: float = 1.0
    image_transform: grain.transforms.Map | grain.transforms.RandomMap | None = None


def _endless(stream: SourceStream, seed: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(SkippingReader(stream.source)).shuffle(seed=seed).repeat(None)
    if isinstance(stream.image_transform, grain.transforms.RandomMap):
        ds = ds.random_map(stream.image_transform, seed=seed)
    elif stream.image_transform is not None:
        ds = ds.map(stream.image_transform)
    return ds


def make_train_dataset(source: Any, example_transform: grain.transforms.Map, batch_transform: grain.transforms.Map,
                       spec: TrainStreamSpec) -> grain.IterDataset:
    """Infinite stream of host-local batches {key: [global_batch / process_count, ...]}; `SKIPPED_KEY` counts the
    unreadable records skipped per example. `source` is one random-access source or a list of `SourceStream`s,
    mixed by weight (grain's `MapDataset.mix`: a deterministic interleaving, so the state stays an index).

    The order is a pure function of (seed, step): every epoch is reshuffled with a new seed, each process reads
    its own slice, and the iterator's `get_state()` (indices only) restores the exact position.
    """
    if spec.global_batch_size % spec.process_count:
        raise ValueError(f"batch_size {spec.global_batch_size} is not divisible by the process count "
                         f"{spec.process_count}")
    streams = source if isinstance(source, list) else [SourceStream(source)]
    if not streams or any(s.weight <= 0 for s in streams):
        raise ValueError(f"a training mixture needs >= 1 source, each with a weight > 0; got weights "
                         f"{[s.weight for s in streams]}")
    # Source 0 keeps the run's seed (a single source reads as before); the others get seeds hashed from (seed, i),
    # so runs with neighbouring seeds do not share a source's order (as seed + i would).
    seeds = [spec.seed] + [int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0] >> 1)
                           for i in range(1, len(streams))]
    parts = [_endless(stream, seed) for stream, seed in zip(streams, seeds, strict=True)]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in streams])
    ds = ds[spec.process_index::spec.process_count]
    ds = ds.map(example_transform)
    ds = ds.batch(spec.global_batch_size // spec.process_count, drop_remainder=True)
    ds = ds.map(batch_transform)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=spec.read_threads,
                                                   prefetch_buffer_size=max(2, spec.read_threads)))
    if spec.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.worker_count))
    return iter_ds


@dataclasses.dataclass
class EvalSet:
    """A fixed evaluation set held in memory: images float32 [N, H, W, 3], labels int32 [N], captions by kind
    (`noisy`, `synthetic`, ...: one string per image; `all`: every caption of each image, a list per image, e.g.
    COCO-style sets' five)."""

    images: np.ndarray
    labels: np.ndarray
    captions: dict[str, list]


def load_eval_set(source: Any, num_examples: int, image_size: int | None = None) -> EvalSet:
    """The first `num_examples` records of a source (a deterministic, held-out set). Images not already square at
    `image_size` (default: the source's `image_size`) are resized (short side) and center-cropped to it."""
    if num_examples > len(source):
        raise ValueError(f"eval set asks for {num_examples} examples but the source has {len(source)}")
    size = image_size or getattr(source, "image_size", None)
    records = [source[i] for i in range(num_examples)]
    kinds = [k[len("caption_"):] for k in records[0] if k.startswith("caption_")]
    captions: dict[str, list] = {kind: [r[f"caption_{kind}"] for r in records] for kind in kinds}
    # `all`: every caption of each image (a multi-caption set's list, else one of each kind, deduplicated).
    captions["all"] = [list(r["captions"]) if "captions" in r else list(dict.fromkeys(r[f"caption_{k}"] for k in kinds))
                       for r in records]
    images = [r["image"] if size is None else resize_center_crop(r["image"], size) for r in records]
    return EvalSet(
        images=normalize_image(np.stack(images)),
        labels=np.asarray([r["label"] for r in records], np.int32),
        captions=captions,
    )
