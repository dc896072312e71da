"""Input kinds of `tools/make_shards.py`: each lists its rows (cheap references, in a deterministic order) and loads
one row (image bytes, captions, label) on demand, so that worker processes can load disjoint ranges of rows.

Paths may be local or on a cloud file system (`gs://...`) through etils.epath. A row that cannot be loaded raises
`BadRow(reason, detail)`; the shard writer counts it and goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from typing import Any

from etils import epath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Column / field names accepted for each part of a row (CSV headers, JSONL keys, parquet columns).
PATH_FIELDS = ("path", "image_path", "filepath", "file_name", "filename", "image", "file")
CAPTION_FIELDS = ("caption", "text", "title", "sentence")
CAPTIONS_FIELDS = ("captions", "sentences")  # lists: COCO-style sets with several captions per image
SYNTHETIC_FIELDS = ("caption_synthetic", "synthetic_caption")
IMAGE_BYTES_FIELDS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes")


class BadRow(Exception):
    """A row that cannot become a record; `reason` is one of the counted skip reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class RawExample:
    """One loaded row. Texts may hold lone surrogates (undecodable bytes, kept by 'surrogateescape') so that the
    writer can report them as non-UTF-8 instead of failing to read the file."""

    key: str
    image_bytes: bytes
    captions: list[str]
    caption_synthetic: str | None = None
    label: int = -1


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def _first(record: dict, names: tuple[str, ...]) -> Any:
    return next((record[n] for n in names if n in record and record[n] is not None), None)


def _label(value: Any) -> int:
    if value is None or value == "":
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRow("bad_label", f"label {value!r} is not an integer") from None


def _read_image(path: epath.Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadRow("missing_file", f"{path} does not exist") from None
    except (OSError, ValueError) as e:  # a directory, a permission error, ...
        raise BadRow("missing_file", f"{path}: {type(e).__name__}: {e}") from None


def _captions_of(record: dict) -> list[str]:
    many = _first(record, CAPTIONS_FIELDS)
    if many is not None and not isinstance(many, str):
        return [_text(c) for c in many]
    one = _first(record, CAPTION_FIELDS)
    if one is None:
        raise BadRow("empty_caption", f"no caption field; expected one of {CAPTION_FIELDS + CAPTIONS_FIELDS}")
    return [_text(one)]


def _example_from_fields(key: str, record: dict, image_bytes: bytes) -> RawExample:
    synthetic = _first(record, SYNTHETIC_FIELDS)
    return RawExample(key, image_bytes, _captions_of(record), None if synthetic is None else _text(synthetic),
                      _label(record.get("label")))


class CaptionFileInput:
    """An image folder with a captions table: CSV / TSV (header row: path, caption[, caption_synthetic][, label])
    or JSONL (one object per pair with the same field names, or `captions: [...]` as COCO converters write).
    Image paths are relative to `images_root` (default: the table's folder) unless absolute."""

    def __init__(self, table: str, images_root: str | None = None):
        self.table = str(table)
        self.images_root = str(images_root or epath.Path(table).parent)

    def rows(self) -> list[tuple[int, dict]]:
        text = epath.Path(self.table).read_bytes().decode("utf-8-sig", "surrogateescape")  # -sig: Excel BOM
        if self.table.endswith((".jsonl", ".json")):
            out = []
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = {"__error__": f"line {i + 1} is not JSON: {e}"}
                out.append((i + 1, record if isinstance(record, dict) else {"__error__": f"line {i + 1}: not an "
                                                                                         "object"}))
            return out
        delimiter = "\t" if self.table.endswith((".tsv", ".tab")) else ","
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if not any(f in PATH_FIELDS for f in fields) or not any(f in CAPTION_FIELDS for f in fields):
            raise ValueError(f"{self.table}: header {reader.fieldnames} needs a path column (one of {PATH_FIELDS}) "
                             f"and a caption column (one of {CAPTION_FIELDS})")
        reader.fieldnames = fields
        return [(i + 2, row) for i, row in enumerate(reader)]  # line numbers, after the header

    def describe(self, ref: tuple[int, dict]) -> str:
        return f"{self.table}:{ref[0]}"

    def load(self, ref: tuple[int, dict]) -> RawExample:
        line, record = ref
        if "__error__" in record:
            raise BadRow("bad_row", record["__error__"])
        path = _first(record, PATH_FIELDS)
        if not path:
            raise BadRow("missing_file", f"line {line} has no image path")
        full = epath.Path(path) if "://" in str(path) or str(path).startswith("/") else \
            epath.Path(self.images_root) / str(path)
        return _example_from_fields(str(path), record, _read_image(full))


class ClassFoldersInput:
    """An image folder tree whose sub-folders are the classes (sorted names = labels 0..C-1); the caption of an
    image is its class name (underscores as spaces), e.g. for evaluation sets."""

    def __init__(self, root: str):
        self.root = epath.Path(root)
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"{root} has no sub-folders; expected one folder of images per class")

    def rows(self) -> list[tuple[int, str]]:
        return [(label, f"{name}/{p.name}") for label, name in enumerate(self.class_names)
                for p in sorted((self.root / name).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]

    def describe(self, ref: tuple[int, str]) -> str:
        return str(self.root / ref[1])

    def load(self, ref: tuple[int, str]) -> RawExample:
        label, relative = ref
        return RawExample(relative, _read_image(self.root / relative),
                          [self.class_names[label].replace("_", " ")], None, label)


class TarInput:
    """webdataset-style tar shards (as img2dataset writes): members `<key>.<ext>` grouped by key; an image
    (`jpg`, `png`, ...), the caption in `<key>.txt` or `<key>.json` (`caption` field), an optional label in
    `<key>.cls` or the json's `label`."""

    def __init__(self, paths: list[str]):
        self.paths = sorted(str(p) for p in paths)
        self._open: dict[str, tarfile.TarFile] = {}

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_open": {}}

    def _tar(self, path: str) -> tarfile.TarFile:
        if path not in self._open:
            self._open[path] = tarfile.open(fileobj=epath.Path(path).open("rb"))
        return self._open[path]

    def rows(self) -> list[tuple[str, str, tuple[str, ...]]]:
        out = []
        for path in self.paths:
            groups: dict[str, list[str]] = {}
            for member in self._tar(path).getmembers():
                if member.isfile():
                    base = member.name.rsplit("/", 1)[-1]
                    prefix = member.name[:len(member.name) - len(base)]
                    key, _, _ = base.partition(".")  # webdataset: the key ends at the first dot of the basename
                    groups.setdefault(prefix + key, []).append(member.name)
            out += [(path, key, tuple(sorted(names))) for key, names in groups.items()]
        return out

    def describe(self, ref: tuple[str, str, tuple[str, ...]]) -> str:
        return f"{ref[0]}:{ref[1]}"

    def load(self, ref: tuple[str, str, tuple[str, ...]]) -> RawExample:
        path, key, names = ref
        tar = self._tar(path)
        by_ext = {name[len(key) + 1:].lower(): name for name in names}
        read = lambda ext: tar.extractfile(by_ext[ext]).read()  # noqa: E731
        image_ext = next((ext for ext in by_ext if "." + ext in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            raise BadRow("missing_file", f"{path}: key {key!r} has no image member (have {sorted(by_ext)})")
        record: dict[str, Any] = {}
        if "json" in by_ext:
            try:
                record = json.loads(_text(read("json")))
            except json.JSONDecodeError as e:
                raise BadRow("bad_row", f"{path}: {key}.json is not JSON: {e}") from None
        if "txt" in by_ext:
            record["caption"] = _text(read("txt"))
        if "cls" in by_ext:
            record["label"] = _text(read("cls")).strip()
        return _example_from_fields(key.rsplit("/", 1)[-1], record, read(image_ext))


class ParquetInput:
    """Parquet files with one row per pair: a caption column and either an image-bytes column (`jpg`, `image`, ...;
    a struct with `bytes` as Hugging Face datasets write it) or a path column relative to `images_root`.
    img2dataset's own parquet files hold metadata (url, caption); point make_shards at its tar shards for images."""

    def __init__(self, paths: list[str], images_root: str | None = None):
        self.paths = sorted(str(p) for p in paths)
        self.images_root = images_root
        self._cache: tuple[tuple[str, int], list[dict]] | None = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _cache=None)

    def _file(self, path: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(epath.Path(path).open("rb"))

    def rows(self) -> list[tuple[str, int, int]]:
        return [(path, group, row) for path in self.paths for group, meta in
                enumerate(self._file(path).metadata.to_dict()["row_groups"]) for row in range(meta["num_rows"])]

    def describe(self, ref: tuple[str, int, int]) -> str:
        return f"{ref[0]}:row_group={ref[1]}:row={ref[2]}"

    def load(self, ref: tuple[str, int, int]) -> RawExample:
        path, group, row = ref
        if self._cache is None or self._cache[0] != (path, group):  # rows come in order: one read per row group
            self._cache = ((path, group), self._file(path).read_row_group(group).to_pylist())
        record = self._cache[1][row]
        key = str(record.get("key", f"{epath.Path(path).stem}-{group}-{row}"))
        image = _first(record, IMAGE_BYTES_FIELDS)
        if isinstance(image, dict):
            image = image.get("bytes")
        if isinstance(image, (bytes, bytearray)):
            return _example_from_fields(key, record, bytes(image))
        relative = _first(record, PATH_FIELDS) or image
        if not relative:
            raise BadRow("missing_file", f"row has no image bytes ({IMAGE_BYTES_FIELDS}) and no path ({PATH_FIELDS})")
        root = epath.Path(self.images_root or epath.Path(path).parent)
        full = epath.Path(relative) if str(relative).startswith("/") or "://" in str(relative) else root / relative
        return _example_from_fields(key, record, _read_image(full))
