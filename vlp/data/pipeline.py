"""grain input pipelines: the training stream (sharded per process, shuffled, batched, checkpointable) and the
fixed evaluation sets."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Any

import grain
import numpy as np

from vlp.data.augment import resize_center_crop
from vlp.data.transforms import SKIPPED_KEY, StampVisit, normalize_image

log = logging.getLogger(__name__)

# Every training record carries how many unreadable records were skipped to produce it (SKIPPED_KEY); batched, the
# train step sums it into the `skipped_bad_records` metric (this works across grain worker processes and hosts).
# A run stops when more than MAX_BAD_SHARE of the last BAD_WINDOW reads of a process are damaged records: 10% of
# a window the size of one default shard (10,000 records) lets a dataset of 10+ shards lose a whole shard (or
# scattered damage of a few percent) and train on, while a source that mostly fails to decode (wrong format,
# wrong path, a broken decoder) stops within its first ~1,000 bad reads instead of training on what is left.
DEFAULT_MAX_BAD_SHARE = 0.1
DEFAULT_BAD_WINDOW = 10_000
# Storage errors (not damage) are retried with exponential backoff: 0.25 + 0.5 + 1 + 2 s before the run stops.
IO_RETRIES = 4
IO_BACKOFF_SECONDS = 0.25
_GOLDEN = (5 ** 0.5 - 1) / 2


def is_storage_error(error: BaseException) -> bool:
    """Whether an exception comes from the storage (a hiccup to retry) rather than from the record's bytes: an
    OSError with an errno (EIO, ETIMEDOUT, EAGAIN, ...), a timeout or a lost connection. PIL's decode errors are
    OSErrors without an errno (truncated / unidentified image): damage, like ValueError from a bad record."""
    return isinstance(error, (TimeoutError, ConnectionError)) or (isinstance(error, OSError)
                                                                  and error.errno is not None)


class StorageError(RuntimeError):
    """A record that the storage failed to deliver after retries: the run stops (it is not skipped)."""


def _coprime_stride(n: int) -> int:
    """The step between replacement candidates: the integer nearest n / golden ratio that is coprime with n, so
    candidates jump far from a damaged region (a whole shard) and visit every record within n tries."""
    stride = max(1, round(n * _GOLDEN))
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


class SkippingReader:
    """A random-access source whose damaged records are replaced by a readable one, and counted.

    Record `index` is read first; if its bytes cannot be decoded, the candidates `(index + k * stride) % n` for
    k = 1, 2, ... are tried (stride ~ n / golden ratio, coprime with n): one hop leaves a damaged region such as a
    whole shard, so no record stands in for a long run of damaged ones. The replacement is a pure function of the
    index, so a resumed run reads exactly what the uninterrupted one did.

    Damage may cost at most `max_bad_share` of the last `bad_window` reads of this process (a picklable window per
    grain worker; only this abort depends on history): beyond it the run stops with the shards and counts. Storage
    errors (`is_storage_error`) are retried `io_retries` times with exponential backoff from `io_backoff_seconds`,
    never skipped (skipping a good record would break exact resume); if they persist the run stops.
    """

    def __init__(self, source: Any, max_bad_share: float = DEFAULT_MAX_BAD_SHARE,
                 bad_window: int = DEFAULT_BAD_WINDOW, io_retries: int = IO_RETRIES,
                 io_backoff_seconds: float = IO_BACKOFF_SECONDS):
        if not 0.0 <= max_bad_share <= 1.0:
            raise ValueError(f"max_bad_share={max_bad_share} must be in [0, 1]")
        if bad_window < 1:
            raise ValueError(f"bad_window={bad_window} must be >= 1 read")
        self.source = source
        self.max_bad_share, self.bad_window = max_bad_share, int(bad_window)
        self.io_retries, self.io_backoff_seconds = int(io_retries), float(io_backoff_seconds)
        self.stride = _coprime_stride(len(source))
        self._init_window()

    def _init_window(self) -> None:
        self._lock = threading.Lock()  # grain reads with several threads
        self._window: collections.deque[int] = collections.deque(maxlen=self.bad_window)  # index if bad, else -1
        self._bad_in_window = 0
        self._errors: collections.deque[str] = collections.deque(maxlen=3)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_window", "_bad_in_window", "_errors")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_window()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        n = len(self.source)
        for attempt in range(n):
            candidate = (int(index) + attempt * self.stride) % n
            try:
                record = dict(self._read(candidate))
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - a record that cannot be decoded is damage: skip it
                log.warning("skipping unreadable training record %d (%s: %s)", candidate, type(e).__name__, e)
                self._count(candidate, f"record {candidate}: {type(e).__name__}: {e}")
                continue
            self._count(-1, "")
            record[SKIPPED_KEY] = np.int32(attempt)
            return record
        raise RuntimeError(f"every one of the {n} training records is unreadable (tried from index {index}); "
                           f"is this the right data source? errors: {list(self._errors)}")

    def _read(self, index: int) -> Any:
        """source[index], retrying storage errors; a persistent storage error stops the run (not a skip)."""
        for retry in range(self.io_retries + 1):
            try:
                return self.source[index]
            except Exception as e:  # noqa: BLE001 - sorted into storage errors and damage
                if not is_storage_error(e):
                    raise
                if retry == self.io_retries:
                    raise StorageError(
                        f"training record {index} (in {self._shard(index)}) could not be read in {retry + 1} tries "
                        f"over ~{self.io_backoff_seconds * (2 ** retry - 1):.1f} s: {type(e).__name__}: {e}. A "
                        "storage error is not a damaged record (skipping it would break exact resume), so the run "
                        "stops; check the storage, then rerun the same command to resume") from e
                log.warning("storage error reading training record %d (%s: %s); retry %d of %d", index,
                            type(e).__name__, e, retry + 1, self.io_retries)
                time.sleep(self.io_backoff_seconds * 2 ** retry)
        raise AssertionError("unreachable")

    def _shard(self, index: int) -> str:
        """The shard file that holds record `index` (sources without shards: the source's type)."""
        shard_of = getattr(self.source, "shard_of", None)
        return shard_of(index) if shard_of else type(self.source).__name__

    def _count(self, bad_index: int, error: str) -> None:
        """Adds one read to this process's window (`bad_index` >= 0: a damaged record); stops the run when more
        than `max_bad_share` of the last `bad_window` reads were damaged."""
        with self._lock:
            if len(self._window) == self.bad_window and self._window[0] >= 0:
                self._bad_in_window -= 1
            self._window.append(bad_index)
            if bad_index < 0:
                return
            self._bad_in_window += 1
            self._errors.append(error)
            if self._bad_in_window <= self.max_bad_share * self.bad_window:
                return
            reads, bad = len(self._window), self._bad_in_window
            by_shard = collections.Counter(self._shard(i) for i in self._window if i >= 0)
            errors = list(self._errors)
        raise RuntimeError(
            f"{bad} of the last {reads} training records read by this process are damaged ({bad / reads:.1%}; "
            f"the bound is {self.max_bad_share:.1%} of {self.bad_window} reads, data.max_bad_record_share / "
            f"data.bad_record_window). Damaged records by shard: {dict(by_shard.most_common(10))}. Last errors: "
            f"{errors}. Rewrite or drop those shards (tools/make_shards.py), or raise the bound")


@dataclasses.dataclass(frozen=True)
class TrainStreamSpec:
    global_batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0
    read_threads: int = 4
    max_bad_share: float = DEFAULT_MAX_BAD_SHARE  # see SkippingReader
    bad_window: int = DEFAULT_BAD_WINDOW


@dataclasses.dataclass(frozen=True)
class SourceStream:
    """One source of a training mixture: its weight and its per-record image transform (e.g. a random resized
    crop to the training size; None keeps the source's images, which must then all have the training size)."""

    source: Any
    weight: float = 1.0
    image_transform: grain.transforms.Map | grain.transforms.RandomMap | None = None


def _endless(stream: SourceStream, seed: int, spec: TrainStreamSpec) -> grain.MapDataset:
    reader = SkippingReader(stream.source, spec.max_bad_share, spec.bad_window)
    ds = grain.MapDataset.source(reader).shuffle(seed=seed).repeat(None)
    if isinstance(stream.image_transform, grain.transforms.RandomMap):
        # grain seeds each element from (seed, its index in this source's endless stream): per visit, and the same
        # for every process count (this runs before the per-process slice).
        ds = ds.random_map(stream.image_transform, seed=seed)
    elif stream.image_transform is not None:
        ds = ds.map(stream.image_transform)
    return ds


def make_train_dataset(source: Any, example_transform: grain.transforms.Map, batch_transform: grain.transforms.Map,
                       spec: TrainStreamSpec) -> grain.IterDataset:
    """Infinite stream of host-local batches {key: [global_batch / process_count, ...]}; `SKIPPED_KEY` counts the
    unreadable records skipped per example. `source` is one random-access source or a list of `SourceStream`s,
    mixed by weight (grain's `MapDataset.mix`: a deterministic interleaving, so the state stays an index).
    `example_transform` sees each example with `VISIT_KEY`, its position in the global stream, from which its random
    choices are drawn (see vlp.data.transforms).

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
    parts = [_endless(stream, seed, spec) for stream, seed in zip(streams, seeds, strict=True)]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in streams])
    # Before the slice: the visit is the position in the global stream, the same for any process and worker count.
    ds = ds.map_with_index(StampVisit())
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


def eval_set_size(source: Any, num_examples: int, what: str = "eval set") -> int:
    """`num_examples`, or the whole source when it is smaller (a 360-image evaluation folder under a config that asks
    for 1,000), said once in the log."""
    if num_examples <= len(source):
        return num_examples
    log.warning("%s asks for %d examples but the source has %d: evaluating on all %d", what, num_examples,
                len(source), len(source))
    return len(source)


def load_eval_set(source: Any, num_examples: int, image_size: int | None = None) -> EvalSet:
    """The first `num_examples` records of a source (a deterministic, held-out set; all of it when smaller). Images not already square at
    `image_size` (default: the source's `image_size`) are resized (short side) and center-cropped to it."""
    num_examples = eval_set_size(source, num_examples)
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
