"""Writes ArrayRecord shards of vlp records from any input kind (see ingest_inputs.py), with a JSON manifest.

Rows are split into shards by position (shard j holds the valid rows among rows [j*S, (j+1)*S)), so shards are
independent: workers write them in parallel, the output is the same for the same input whatever the worker count,
and an interrupted run resumes by skipping the shards whose sidecar `<shard>.json` (written last) exists.
Invalid rows are skipped, counted by reason and listed in `<split>-skipped.jsonl`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from typing import Any

from etils import epath
from PIL import Image
from tqdm import tqdm

from vlp.data import records
from vlp.data.ingest_inputs import BadRow, RawExample

MANIFEST = "manifest.json"
FORMAT = "vlp-arrayrecord-v1"
# Images are already compressed: one record per group gives random access without decompressing neighbours.
WRITER_OPTIONS = "group_size:1,uncompressed"
SKIP_REASONS = ("missing_file", "empty_image", "corrupt_image", "empty_caption", "non_utf8_caption", "bad_label",
                "bad_row")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _check_text(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("non_utf8_caption", f"{what} is not valid UTF-8: {text!r}") from None
    text = text.strip()
    if not text:
        raise BadRow("empty_caption", f"{what} is empty")
    return text


def _check_image(image_bytes: bytes, resize_short_side: int) -> bytes:
    """Decodes the whole image (a truncated JPEG fails only when its pixels are read); returns the bytes to
    store: the original, or a JPEG re-encode when the short side exceeds `resize_short_side` (> 0)."""
    if not image_bytes:
        raise BadRow("empty_image", "zero-byte image")
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            if resize_short_side and min(image.size) > resize_short_side:
                scale = resize_short_side / min(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                out = io.BytesIO()
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=95)
                return out.getvalue()
            image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadRow("corrupt_image", f"{type(e).__name__}: {e}") from None
    return image_bytes


def validate_example(example: RawExample, resize_short_side: int = 0) -> bytes:
    """A loaded row -> serialized record bytes, or BadRow naming why it is unusable."""
    captions = [_check_text(c, "caption") for c in example.captions]
    if not captions:
        raise BadRow("empty_caption", "no caption")
    synthetic = None if example.caption_synthetic is None else _check_text(example.caption_synthetic,
                                                                           "synthetic caption")
    image_bytes = _check_image(example.image_bytes, resize_short_side)
    return records.encode_record(example.key, image_bytes, captions, example.label, synthetic)


def file_sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(out_dir: str) -> list[str]:
    """Problems found when every shard of every split is checked against the manifest's SHA-256 ([] = intact)."""
    out = epath.Path(out_dir)
    if not (out / MANIFEST).exists():
        return [f"no {MANIFEST} in {out_dir}"]
    problems = []
    for split, entry in json.loads((out / MANIFEST).read_text())["splits"].items():
        for shard in entry["shards"]:
            path = out / shard["file"]
            if not path.exists():
                problems.append(f"{split}: {shard['file']} is missing")
            elif file_sha256(path) != shard["sha256"]:
                problems.append(f"{split}: {shard['file']} does not match its checksum (damaged or rewritten)")
    return problems


def _write_shard(job: tuple[Any, list, int, str, str, int]) -> dict:
    """Writes one shard (locally, then copied into place) and its sidecar; returns the sidecar dict."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source, refs, first_row, out_dir, name, resize_short_side = job
    skipped, counts, has_synthetic, max_captions = [], collections.Counter(), True, 0
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        writer = ArrayRecordWriter(local, WRITER_OPTIONS)
        num_records = 0
        for offset, ref in enumerate(refs):
            try:
                example = source.load(ref)
                data = validate_example(example, resize_short_side)
            except BadRow as e:
                counts[e.reason] += 1
                skipped.append({"row": first_row + offset, "where": source.describe(ref), "reason": e.reason,
                                "detail": e.detail})
                continue
            writer.write(data)
            num_records += 1
            has_synthetic &= example.caption_synthetic is not None
            max_captions = max(max_captions, len(example.captions))
        writer.close()
        digest = file_sha256(epath.Path(local))
        target = epath.Path(out_dir) / name
        with open(local, "rb") as src, (epath.Path(out_dir) / (name + ".tmp")).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        (epath.Path(out_dir) / (name + ".tmp")).rename(target)
    sidecar = {"file": name, "num_records": num_records, "sha256": digest, "num_rows": len(refs),
               "skipped_counts": dict(sorted(counts.items())), "skipped": skipped,
               "has_synthetic_caption": bool(num_records and has_synthetic), "max_captions": max_captions}
    (epath.Path(out_dir) / (name + ".json")).write_text(json.dumps(sidecar, sort_keys=True))
    return sidecar


def write_shards(source: Any, out_dir: str, split: str = "train", shard_size: int = 10_000, workers: int = 1,
                 resize_short_side: int = 0, class_names: list[str] | None = None) -> dict:
    """Writes `<out_dir>/<split>-NNNNN-of-MMMMM.array_record` shards, `<split>-skipped.jsonl` and updates
    `<out_dir>/manifest.json` (other splits' entries are kept). Returns the split's manifest entry."""
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard_size={shard_size} and workers={workers} must be >= 1")
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = source.rows()
    count = max(1, -(-len(refs) // shard_size))
    jobs = [(source, refs[j * shard_size:(j + 1) * shard_size], j * shard_size, str(out), shard_name(split, j, count),
             resize_short_side) for j in range(count)]
    done = {job[4]: json.loads((out / (job[4] + ".json")).read_text()) for job in jobs
            if (out / (job[4] + ".json")).exists() and (out / job[4]).exists()}
    todo = [job for job in jobs if job[4] not in done]
    print(f"make_shards: {len(refs)} rows -> {count} shards of <= {shard_size} ({len(done)} already written)",
          file=sys.stderr)
    bar = tqdm(total=count, initial=len(done), unit="shard", file=sys.stderr, dynamic_ncols=True)
    if workers == 1 or len(todo) <= 1:
        results = map(_write_shard, todo)
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)))
        results = pool.imap_unordered(_write_shard, todo)
    for sidecar in results:
        done[sidecar["file"]] = sidecar
        bar.update(1)
    if workers > 1 and len(todo) > 1:
        pool.close()
        pool.join()
    bar.close()
    return _write_manifest(out, split, [done[job[4]] for job in jobs], len(refs), class_names)


def _write_manifest(out: epath.Path, split: str, sidecars: list[dict], num_rows: int,
                    class_names: list[str] | None) -> dict:
    counts = collections.Counter()
    for sidecar in sidecars:
        counts.update(sidecar["skipped_counts"])
    with (out / f"{split}-skipped.jsonl").open("w") as f:
        for sidecar in sidecars:
            for row in sidecar["skipped"]:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
    entry = {
        "num_records": sum(s["num_records"] for s in sidecars),
        "num_input_rows": num_rows,
        "skipped": {reason: counts[reason] for reason in sorted(counts)},
        "skipped_report": f"{split}-skipped.jsonl",
        "has_synthetic_caption": all(s["has_synthetic_caption"] for s in sidecars if s["num_records"]),
        "max_captions": max((s["max_captions"] for s in sidecars), default=0),
        "shards": [{"file": s["file"], "num_records": s["num_records"], "sha256": s["sha256"]} for s in sidecars],
    }
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"format": FORMAT, "splits": {}}
    manifest["splits"][split] = entry
    if class_names is not None:
        manifest["class_names"] = list(class_names)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry
