"""Data sources by spec: random-access record sources that the grain pipeline reads.

A spec is one string (`data.source`, and each entry of `data.mixture`):
  `shapes`                         the embedded procedural dataset
  `shapes:classes=<lo>-<hi>`       the same with the main shape's class drawn from labels lo..hi only (continual
                                   training phases, e.g. Mod-X on two halves of the 64 classes)
  `shapes:xor`                     its three-modality variant: image, keyed text, 1-D `signal` (data/shapes_xor.py)
  `arrayrecord:<dir or manifest>`  shards written by tools/make_shards.py (`<dir>/manifest.json`)
  `tfds:<name>[:<version>]`        a prepared TFDS dataset, read through `tfds.data_source` (no TensorFlow);
                                   `name` may hold a config (`coco_captions/2017`); data dir: $TFDS_DATA_DIR

Every source yields dicts with `image` uint8 [H, W, 3] (at the source's decode size), `caption_noisy` (the main
caption), `caption_synthetic` (the second caption, else the main one), `label` (int, -1 = unlabelled) and `index`;
ArrayRecord records also carry `captions` (all captions of the image) and `key`. Extra modalities (more than
image and text) are 1-D float32 arrays under `signal*` keys (`signal` for shapes:xor; `signal_<name>` from shards).
"""

from __future__ import annotations

import bisect
import itertools
import json
from typing import Any

from etils import epath

from vlp.data import records, shapes

SPEC_FORMS = ("shapes", "shapes:classes=<lo>-<hi>", "shapes:xor", "arrayrecord:<dir or manifest.json>",
              "tfds:<name>[:<version>]")
SOURCES = ("shapes", "arrayrecord", "tfds")
# Zero-shot prompts for sources other than shapes (a short subset of CLIP's ImageNet templates).
GENERIC_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.",
                     "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.")


def parse_spec(spec: str) -> tuple[str, str]:
    """`"arrayrecord:/data/x"` -> ("arrayrecord", "/data/x"); a bad spec names the valid forms."""
    kind, sep, arg = str(spec).partition(":")
    if kind == "shapes" and not sep:
        return kind, ""
    if kind == "shapes" and arg == "xor":
        return kind, arg  # the three-modality variant (vlp.data.shapes_xor)
    if kind == "shapes" and shapes_classes(arg) is not None:
        return kind, arg
    if kind in ("arrayrecord", "tfds") and arg:
        return kind, arg
    raise ValueError(f"unknown data source {spec!r}; valid forms: {list(SPEC_FORMS)}")


def shapes_classes(arg: str) -> tuple[int, ...] | None:
    """`"classes=0-31"` -> (0, ..., 31); None for any other argument (the spec is then invalid)."""
    key, _, value = arg.partition("=")
    lo, _, hi = value.partition("-")
    if key != "classes" or not (lo.isdigit() and hi.isdigit()):
        return None
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi < len(shapes.CLASS_NAMES):
        raise ValueError(f"shapes:{arg}: the class range must lie in 0-{len(shapes.CLASS_NAMES) - 1} with lo <= hi")
    return tuple(range(lo, hi + 1))


# ------------------------------------------------------------------------------------------------ ArrayRecord


def _manifest_path(arg: str) -> epath.Path:
    path = epath.Path(arg)
    return path if str(arg).endswith(".json") else path / "manifest.json"


def load_manifest(arg: str) -> dict:
    path = _manifest_path(arg)
    if not path.exists():
        raise ValueError(f"data source arrayrecord:{arg}: no manifest at {path}; write the shards with "
                         "tools/make_shards.py --out=<dir> and give arrayrecord:<dir>")
    return json.loads(path.read_text())


class ArrayRecordSource:
    """Random access over one split of vlp ArrayRecord shards; `source[i]` decodes record i (see records.py).

    Picklable (grain workers reopen the files). `image_size` is a decode hint: JPEGs decode at a reduced scale
    that keeps both sides >= image_size.
    """

    def __init__(self, manifest_arg: str, split: str, image_size: int | None = None,
                 num_examples: int | None = None):
        manifest = load_manifest(manifest_arg)
        if split not in manifest["splits"]:
            raise ValueError(f"data source arrayrecord:{manifest_arg} has no split {split!r}; valid: "
                             f"{sorted(manifest['splits'])}")
        entry = manifest["splits"][split]
        root = _manifest_path(manifest_arg).parent
        shards = [s for s in entry["shards"] if s["num_records"]]
        self.paths = [str(root / s["file"]) for s in shards]
        self._shard_ends = list(itertools.accumulate(int(s["num_records"]) for s in shards))  # for shard_of
        self.split, self.image_size = split, image_size
        self.has_synthetic_caption = entry["has_synthetic_caption"]
        total = entry["num_records"]
        if not total:
            raise ValueError(f"data source arrayrecord:{manifest_arg} split {split!r} has no records")
        self.num_examples = total if num_examples is None else min(int(num_examples), total)
        self._reader = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _reader=None)

    def _data(self):
        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        return self._reader

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples}) for split {self.split!r}")
        return records.decode_record(self._data()[index], index, self.image_size)

    def shard_of(self, index: int) -> str:
        """The shard file that holds record `index` (for error messages about damaged records)."""
        return self.paths[bisect.bisect_right(self._shard_ends, int(index))]

    def __repr__(self) -> str:
        return f"ArrayRecordSource(split={self.split!r}, num_examples={self.num_examples}, shards={len(self.paths)})"


# ------------------------------------------------------------------------------------------------------- TFDS


def _tfds_name(arg: str) -> tuple[str, str | None]:
    name, _, version = arg.partition(":")
    return name, version or None


def _tfds_builder(arg: str):
    import tensorflow_datasets as tfds

    name, version = _tfds_name(arg)
    try:
        return tfds.builder(f"{name}:{version}" if version else name)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for unknown / unprepared sets
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"data source tfds:{arg}: {type(e).__name__}: {first_line}") from e


def _tfds_features(builder) -> tuple[str | None, str | None, str | None]:
    """(image key, label key, text key) of a TFDS dataset: its first Image, ClassLabel and Text features."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    first = lambda kind: next((k for k, f in features.items() if isinstance(f, kind)), None)  # noqa: E731
    return first(tfds.features.Image), first(tfds.features.ClassLabel), first(tfds.features.Text)


class TfdsSource:
    """One split of a prepared TFDS dataset through `tfds.data_source` (ArrayRecord files; no TensorFlow). The
    caption is the first Text feature, else "a photo of a <class name>." from the first ClassLabel feature."""

    def __init__(self, arg: str, split: str, image_size: int | None = None, num_examples: int | None = None):
        import tensorflow_datasets as tfds

        builder = _tfds_builder(arg)
        self.image_key, self.label_key, self.text_key = _tfds_features(builder)
        if self.image_key is None:
            raise ValueError(f"data source tfds:{arg} has no Image feature; features: "
                             f"{sorted(builder.info.features)}")
        if builder.info.splits and split not in builder.info.splits:
            raise ValueError(f"data source tfds:{arg} has no split {split!r}; valid: {sorted(builder.info.splits)}")
        self.arg, self.split, self.image_size = arg, split, image_size
        self.class_names = builder.info.features[self.label_key].names if self.label_key else None
        self.has_synthetic_caption = False
        name, version = _tfds_name(arg)
        try:
            self._data = tfds.data_source(f"{name}:{version}" if version else name, split=split, download=False)
        except Exception as e:  # noqa: BLE001 - not prepared, not ArrayRecord, ...
            raise ValueError(f"data source tfds:{arg} split {split!r} cannot be read ({type(e).__name__}: {e}); "
                             "prepare it as ArrayRecord first (tfds build --file_format=array_record, which needs "
                             "TensorFlow) under $TFDS_DATA_DIR") from e
        total = len(self._data)
        self.num_examples = total if num_examples is None else min(int(num_examples), total)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples}) for split {self.split!r}")
        example = self._data[index]
        label = int(example[self.label_key]) if self.label_key else -1
        if self.text_key:
            caption = example[self.text_key]
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        else:
            caption = GENERIC_TEMPLATES[0].format(self.class_names[label]) if label >= 0 else ""
        image = example[self.image_key]
        if image.ndim == 2 or image.shape[-1] == 1:  # grayscale sets (e.g. MNIST-like)
            image = image.reshape(image.shape[:2] + (1,)).repeat(3, axis=-1)
        return {"image": image, "caption_noisy": caption, "caption_synthetic": caption, "captions": [caption],
                "label": label, "index": index}


# --------------------------------------------------------------------------------------------- by spec


def make_source(spec: str, split: str, image_size: int, num_examples: int | None = None) -> Any:
    """The source of one split; records are dicts with `image`, `caption_*`, `label`, `index` (module doc)."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        if arg == "xor":
            from vlp.data import shapes_xor
            return shapes_xor.XorShapesSource(split, num_examples=num_examples, image_size=image_size)
        return shapes.ShapesSource(split, num_examples=num_examples, image_size=image_size,
                                   classes=shapes_classes(arg) if arg else None)
    if kind == "arrayrecord":
        return ArrayRecordSource(arg, split, image_size, num_examples)
    return TfdsSource(arg, split, image_size, num_examples)


def check_spec(spec: str) -> None:
    """Raises ValueError naming what is wrong with a spec (bad form, missing manifest, unknown TFDS set)."""
    kind, arg = parse_spec(spec)
    if kind == "arrayrecord":
        load_manifest(arg)
    elif kind == "tfds":
        _tfds_builder(arg)


def split_names(spec: str) -> tuple[str, ...] | None:
    """The splits of a source, or None where the source cannot list them before it is opened."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return shapes.SPLITS
    if kind == "arrayrecord":
        return tuple(sorted(load_manifest(arg)["splits"]))
    return tuple(sorted(_tfds_builder(arg).info.splits)) or None  # an unprepared set lists none


def has_synthetic_captions(spec: str, split: str = "train") -> bool:
    """Whether every record of the split has its own second (synthetic) caption."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return True
    if kind == "arrayrecord":
        splits = load_manifest(arg)["splits"]
        return bool(splits.get(split, {}).get("has_synthetic_caption", False))
    return False


def augmentable(spec: str) -> bool:
    """Whether random crops and flips keep captions true: not for shapes, whose captions name positions, nor for
    shards whose manifest says `"augmentable": false` (tools/poison.py's shapes-derived sets)."""
    kind, arg = parse_spec(spec)
    if kind == "arrayrecord":
        return bool(load_manifest(arg).get("augmentable", True))
    return kind != "shapes"


def class_names(spec: str) -> tuple[str, ...]:
    """Class names of a labelled source (for zero-shot classification)."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return shapes.CLASS_NAMES
    if kind == "arrayrecord":
        names = load_manifest(arg).get("class_names")
        if names:
            return tuple(names)
        raise ValueError(f"data source {spec!r} has no class names (its manifest lists none; make_shards writes "
                         "them for --class_folders input)")
    builder = _tfds_builder(arg)
    label_key = _tfds_features(builder)[1]
    if label_key is None:
        raise ValueError(f"data source {spec!r} has no ClassLabel feature; features: {sorted(builder.info.features)}")
    return tuple(builder.info.features[label_key].names)


def all_captions(spec: str, split: str = "train", limit: int | None = None) -> list[str]:
    """Every caption of the first `limit` records of a split (all of them by default), in record order: the
    main caption(s), then the synthetic one where a record has its own. For tokenizer training: ArrayRecord
    shards are read without decoding images, shapes draws only layouts."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return shapes.all_captions(split, limit or shapes.SPLIT_SIZES[split])
    out: list[str] = []
    if kind == "arrayrecord":
        source = ArrayRecordSource(arg, split, num_examples=limit)
        for i in range(len(source)):
            header, _ = records.decode_header(source._data()[i])
            out += header["captions"] + ([header["caption_synthetic"]] if "caption_synthetic" in header else [])
        return out
    source = TfdsSource(arg, split, num_examples=limit)
    return [source[i]["caption_noisy"] for i in range(len(source))]


def class_prompts(spec: str, class_name: str) -> list[str]:
    """Zero-shot prompt ensemble for one class of a source."""
    if parse_spec(spec)[0] == "shapes":
        return shapes.class_prompts(class_name)
    return [template.format(class_name.replace("_", " ")) for template in GENERIC_TEMPLATES]
