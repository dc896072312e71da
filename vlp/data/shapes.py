"""The embedded default dataset: procedural coloured shapes with dual captions, class labels and masks.

Every example is generated on the fly from ``(split, index)`` (no download, any size, any resolution) by a
generator seeded with (salt, split id, index) packed into disjoint bit fields (see _rng),
so the splits are disjoint and the same index always gives the same example. The only caches are pure
functions of ``image_size`` (pixel-centre vectors, shape lookup tables).

An example shows one *main* shape (8 shapes x 8 colours = the 64 classes, ``CLASS_NAMES``) in one of 4
quadrants (``POSITIONS``) at one of 3 sizes (``SIZES``), plus 0-2 smaller distractor shapes whose colour and
shape both differ from the main one (so a colour histogram cannot simply read off the class), on a textured
low-saturation grey background (gradient + optional stripes + noise) that never looks like one of the colours.

Sizes and positions are defined at 32 px and scaled with ``image_size``: the main shape spans (at most) a disc
of diameter 11-13 px (small), 15-17.5 px (medium) or 19.5-22 px (large), distractors 6-9 px; its area centroid
lies in its quadrant, at least 4 px from the image midlines. Content (label, geometry, captions) does not
depend on ``image_size``; only the rendering does.

Measured (tests assert the bounds): a 4x4x4 colour-histogram nearest-centroid classifier gets ~13% top-1
(``colour_histogram_baseline(5000, 2000)``; chance 1.6%, bound 40%); 555 distinct synthetic captions among
validation examples 0..999 (bound >= 500); ``make_example`` at 32 px takes ~0.1-0.2 ms on one core.

Captions (as TIPS's dual captions):
- ``caption_synthetic``: always correct, "a {size} {colour} {shape} in the {position}" (768 distinct texts;
  about 560 distinct per 1000 random examples).
- ``caption_noisy``: short, web-like, e.g. "circle red top left img". Word order varies, size/position/filler
  words are optional, colour and shape words are replaced by a synonym 20% of the time each (``COLOUR_SYNONYMS``,
  ``SHAPE_SYNONYMS``). It never contradicts the label, but in 10% of captions one class word is dropped
  (colour 5%, shape 5%), so ~90% of noisy captions name both the colour and the shape (or a synonym).

``mask`` [H, W] uint8: 0 = background, ``1 + label`` on the visible pixels of the main shape, and
``1 + class`` of each distractor on its visible pixels (the main shape is drawn last, on top).
"""

from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (240, 230, 40),
    "green": (40, 190, 50),
    "cyan": (20, 215, 225),
    "blue": (40, 70, 240),
    "purple": (160, 50, 220),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SIZES: dict[str, int] = {"train": 1_000_000, "validation": 10_000, "test": 10_000}

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"), "orange": ("amber", "tangerine"), "yellow": ("golden", "lemon"),
    "green": ("lime", "emerald"), "cyan": ("teal", "aqua"), "blue": ("azure", "cobalt"),
    "purple": ("violet", "lilac"), "white": ("ivory", "snow"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "dot"), "square": ("box", "block"), "triangle": ("tri", "wedge"),
    "cross": ("plus", "cross sign"), "diamond": ("rhombus", "lozenge"), "ring": ("donut", "hoop"),
    "star": ("starburst", "star icon"), "heart": ("love heart", "valentine"),
}
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "mid"), "large": ("large", "big", "huge")}
_VERTICAL_WORDS = {"upper": ("upper", "top"), "lower": ("lower", "bottom")}
_FILLERS = ("photo", "img", "pic", "image", "jpg", "png", "stock photo", "clipart", "icon", "hd", "vector")

# Noisy-caption corruption rates (documented in the module docstring).
_P_DROP_COLOUR, _P_DROP_SHAPE = 0.05, 0.05
_P_SYNONYM = 0.2

_SEED_SALT = 0x5EA9E5  # fixed, so the dataset never changes between releases
_SPLIT_IDS = {"train": 1, "validation": 2, "test": 3}
_REF = 32.0  # geometry is specified at 32 px and scaled
_DIAMETERS = ((11.0, 13.0), (15.0, 17.5), (19.5, 22.0))  # per SIZES entry, at 32 px
_DISTRACTOR_DIAMETER = (6.0, 9.0)
_MIDLINE_MARGIN = 4.0  # clear of the 16-px patch boundary, so a tiny ViT can read the quadrant
_MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE = 16, 1024
_MAX_GRAIN = 24.0  # peak-to-peak amplitude of the grain added to every pixel
_TABLE_EXTENT = 1.15  # every shape fits [-1.1, 1.1]^2 in normalised units


# ----------------------------------------------------------------------------------------- shape rasterisers
# Implicit shapes in normalised coordinates (u right, v down; broadcasting arrays -> bool mask): each fits in
# [-1.1, 1.1]^2 with its area centroid at the origin. Only used to build the lookup tables (_shape_tables).

def _star(u, v):  # five points, one pointing up
    r, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)
    return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * (theta + np.pi / 2))) ** 2.5


def _heart(u, v):  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 with y up, rescaled and shifted onto its centroid
    x, y = u * 1.22, -(v * 1.22 - 0.2935)
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


_RASTERISERS = (  # in SHAPES order
    lambda u, v: u * u + v * v <= 1.0,  # circle
    lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),  # square
    lambda u, v: (v <= 0.55) & (math.sqrt(3) * np.abs(u) - v <= 1.1),  # triangle, vertices on radius 1.1
    lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 0.95),  # cross
    lambda u, v: np.abs(u) + np.abs(v) <= 1.0,  # diamond
    lambda u, v: np.abs(u * u + v * v - 0.625) <= 0.375,  # ring: 0.25 <= r^2 <= 1
    _star,
    _heart,
)


class _Layout(NamedTuple):
    """Everything about an example except its pixels; geometry in 32-px units."""
    label: int
    size: int  # index into SIZES
    position: int  # index into POSITIONS
    cx: float
    cy: float
    radius: float
    rgb: tuple[float, float, float]
    distractors: tuple[tuple[int, float, float, float, tuple], ...]  # (class, cx, cy, radius, rgb)
    caption_noisy: str
    caption_synthetic: str


# ---------------------------------------------------------------------------------------------- validation

def _check_split(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid splits: {SPLITS}")
    return _SPLIT_IDS[split]


def _check_image_size(image_size: int) -> int:
    if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
            or not _MIN_IMAGE_SIZE <= image_size <= _MAX_IMAGE_SIZE):
        raise ValueError(f"image_size must be an int in [{_MIN_IMAGE_SIZE}, {_MAX_IMAGE_SIZE}], got {image_size!r}")
    return int(image_size)


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < 2 ** 64:
        raise ValueError(f"index must be an int in [0, 2**64), got {index!r}")
    return int(index)


def _rng(split: str, index: int) -> random.Random:
    """The example's own generator. The seed packs (salt, split id, index) into disjoint bit fields, so distinct
    (split, index) pairs always get distinct seeds. Python's Mersenne Twister is used rather than a numpy
    Generator because it is seeded ~3x faster (5 vs 16 us; SeedSequence dominated make_example) and its random()
    stream for a given int seed is guaranteed stable across Python versions."""
    return random.Random((_SEED_SALT << 72) | (_check_split(split) << 64) | _check_index(index))


def _uniforms(rng: random.Random) -> list[float]:
    """All scalar draws of one example, taken up front in a fixed number, so captions never depend on pixels."""
    return [rng.random() for _ in range(_N_UNIFORMS)]


# ------------------------------------------------------------------------------------------------- layout
# Each part of the layout reads its own fixed slice of the uniforms, so changing one part's logic does not
# shift the others' draws.
_DISTRACTOR_TRIES = 7  # rejection-sampling tries per distractor; (6 + 2 * tries) draws each
_MAIN, _DISTRACT, _CAPTION, _BACKGROUND = slice(0, 9), slice(9, 50), slice(50, 64), slice(64, 75)
_N_UNIFORMS = 75


def _pick(options: tuple, u: float):
    return options[int(u * len(options))]


def _noisy_caption(u: list[float], colour: str, shape: str, size: str, position: str) -> str:
    colour_word = _pick(COLOUR_SYNONYMS[colour], u[1]) if u[0] < _P_SYNONYM else colour
    shape_word = _pick(SHAPE_SYNONYMS[shape], u[3]) if u[2] < _P_SYNONYM else shape
    if u[4] < _P_DROP_COLOUR:
        colour_word = ""
    elif u[4] < _P_DROP_COLOUR + _P_DROP_SHAPE:
        shape_word = ""
    vertical, horizontal = position.split()
    vertical_word = _pick(_VERTICAL_WORDS[vertical], u[6])
    position_word = ""
    if u[5] < 0.6:  # a true but possibly partial position: "left", "top", "top left", "upper left"
        position_word = _pick((horizontal, vertical_word, f"{vertical_word} {horizontal}"), u[7])
    size_word = _pick(_SIZE_WORDS[size], u[9]) if u[8] < 0.3 else ""
    words = [size_word] + ([colour_word, shape_word] if u[10] >= 0.25 else [shape_word, colour_word])
    words = [position_word] + words if u[11] < 0.2 else words + [position_word]
    if u[12] < 0.35:
        filler = _pick(_FILLERS, u[13])
        words = [filler] + words if u[12] < 0.15 else words + [filler]
    return " ".join(w for w in words if w)


def _jitter_rgb(colour: str, u: list[float]) -> tuple[float, float, float]:
    """The named colour with +-20 per channel of jitter, so colours are not single RGB points."""
    return tuple(min(max(c + 40.0 * d - 20.0, 0.0), 255.0 - _MAX_GRAIN) for c, d in zip(COLOUR_RGB[colour], u))


def _place_distractors(u: list[float], main_cls: int, cx: float, cy: float, radius: float):
    main_colour, main_shape = divmod(main_cls, len(SHAPES))
    placed: list[tuple[int, float, float, float, tuple]] = []
    per = 6 + 2 * _DISTRACTOR_TRIES
    for k in range(int(u[0] * 3)):  # 0, 1 or 2 distractors
        d = u[1 + k * per: 1 + (k + 1) * per]
        # Colour and shape both differ from the main shape's, so labels and mask stay unambiguous.
        colour = (main_colour + 1 + int(d[0] * (len(COLOURS) - 1))) % len(COLOURS)
        shape = (main_shape + 1 + int(d[1] * (len(SHAPES) - 1))) % len(SHAPES)
        r = (_DISTRACTOR_DIAMETER[0] + d[2] * (_DISTRACTOR_DIAMETER[1] - _DISTRACTOR_DIAMETER[0])) / 2
        for t in range(_DISTRACTOR_TRIES):
            dx, dy = (r + d[6 + 2 * t + j] * (_REF - 2 * r) for j in range(2))
            # Up to ~1 px of overlap with the main shape (drawn on top) is allowed; none between distractors.
            if math.hypot(dx - cx, dy - cy) < radius + r - 1.0:
                continue
            if any(math.hypot(dx - p[1], dy - p[2]) < r + p[3] for p in placed):
                continue
            placed.append((colour * len(SHAPES) + shape, dx, dy, r, _jitter_rgb(COLOURS[colour], d[3:6])))
            break
    return tuple(placed)


def _layout(u: list[float], classes: tuple[int, ...] | None = None) -> _Layout:
    """`classes` (None: all) restricts the main shape's label; the other draws are unchanged."""
    m = u[_MAIN]
    size, position = int(m[1] * len(SIZES)), int(m[2] * len(POSITIONS))
    label = int(m[0] * len(CLASS_NAMES)) if classes is None else classes[int(m[0] * len(classes))]
    lo_d, hi_d = _DIAMETERS[size]
    radius = (lo_d + m[3] * (hi_d - lo_d)) / 2
    # Keep the shape inside the image and its centroid inside its quadrant, clear of the midlines.
    lo, hi = radius, _REF / 2 - _MIDLINE_MARGIN
    cx, cy = lo + m[4] * (hi - lo), lo + m[5] * (hi - lo)
    if position % 2 == 1:  # right
        cx = _REF - cx
    if position >= 2:  # lower
        cy = _REF - cy
    colour, shape = COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    rgb = _jitter_rgb(colour, m[6:9])
    distractors = _place_distractors(u[_DISTRACT], label, cx, cy, radius)
    noisy = _noisy_caption(u[_CAPTION], colour, shape, SIZES[size], POSITIONS[position])
    synthetic = f"a {SIZES[size]} {colour} {shape} in the {POSITIONS[position]}"
    return _Layout(label, size, position, cx, cy, radius, rgb, distractors, noisy, synthetic)


# ---------------------------------------------------------------------------------------------- rendering
# Images are composed channel-first [3, S, S] in float32 (broadcasts over a trailing dim of 3 are slow).

@functools.lru_cache(maxsize=16)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates [S] in 32-px units, the same in [-1, 1], and [ones; the latter] [2, S]
    (a pure cache)."""
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) * np.float32(_REF / image_size)
    unit = centres * np.float32(2 / _REF) - 1
    return centres, unit, np.stack([np.ones_like(unit), unit])


def _background(u: list[float], image_size: int) -> tuple[np.ndarray, float]:
    """Smooth low-saturation grey texture [3, S, S] float32 (tint + gradient + optional stripes) and the
    amplitude of the grain that make_example adds last. Values stay in [2, 140] before the grain."""
    base, grad_amp, grad_angle, stripe_amp, stripe_freq, stripe_angle, stripe_phase, grain_amp = (
        lo + x * (hi - lo) for x, lo, hi in zip(
            u, (62, -18, 0, 0, 2, 0, 0, 8), (95, 18, 2 * math.pi, 14, 6, math.pi, 2 * math.pi, _MAX_GRAIN)))
    if stripe_amp < 5:  # about 1/3 of backgrounds have no stripes
        stripe_amp = 0.0
    # On the basis B = [1, c, cos(b c), sin(b c), sin(a c + p), cos(a c + p)] ([6, S], c = pixel centres in
    # [-1, 1]), tint + base + gx x + gy y + A sin(a x + b y + p) is B^T W B for a sparse W [3, 6, 6]:
    # two tiny matmuls instead of many full-image ops (the stripes' sine splits into products).
    a, b = math.pi * stripe_freq * math.cos(stripe_angle), math.pi * stripe_freq * math.sin(stripe_angle)
    c = _pixel_centres(image_size)[1]
    freq_phase = np.array([[b, b, a, a], [math.pi / 2, 0.0, stripe_phase, stripe_phase + math.pi / 2]], np.float32)
    basis = np.empty((6, image_size), np.float32)
    basis[:2] = _pixel_centres(image_size)[2]
    np.sin(freq_phase[0, :, None] * c + freq_phase[1, :, None], out=basis[2:])
    weights = np.zeros((3, 6, 6), np.float32)
    weights[:, 0, 0] = [base - grain_amp / 2 + 16 * t - 8 for t in u[8:11]]  # -grain/2 centres the grain
    weights[:, 0, 1] = grad_amp * math.cos(grad_angle)  # on (1, x): x runs along the right factor's columns
    weights[:, 1, 0] = grad_amp * math.sin(grad_angle)  # on (y, 1)
    weights[:, 2, 4] = weights[:, 3, 5] = stripe_amp
    return (basis.T @ weights) @ basis, grain_amp


@functools.lru_cache(maxsize=16)
def _shape_tables(image_size: int) -> np.ndarray:
    """Each shape sampled on a fine grid over [-_TABLE_EXTENT, _TABLE_EXTENT]^2: bool [8, T, T] (a pure cache).

    Drawing gathers from the table (two takes) instead of evaluating the shape's implicit function on the
    pixels (up to ~15 ops, arctan2 and powers included). T = 256 (8 samples per pixel) at 32 px, 4 per pixel up
    to 512 px, capped at 2048: 0.5 MiB in all at 32 px, 6 MiB at 224 px, at most 32 MiB.
    """
    t = min(max(256, 4 * image_size), 2048)
    c = (np.arange(t, dtype=np.float32) + 0.5) * np.float32(2 * _TABLE_EXTENT / t) - np.float32(_TABLE_EXTENT)
    return np.stack([f(c[None, :], c[:, None]) for f in _RASTERISERS])


def _draw(image: np.ndarray, mask: np.ndarray, cls: int, cx: float, cy: float, radius: float, rgb) -> None:
    """Paints shape ``cls % 8`` into image [3, S, S] and ``cls + 1`` into mask [S, S], in place."""
    size = mask.shape[0]
    scale = size / _REF
    # Only rasterise the shape's bounding window (matters at high resolution).
    reach = radius * _TABLE_EXTENT
    x0, x1 = max(int((cx - reach) * scale), 0), min(int((cx + reach) * scale) + 2, size)
    y0, y1 = max(int((cy - reach) * scale), 0), min(int((cy + reach) * scale) + 2, size)
    table = _shape_tables(size)[cls % len(SHAPES)]
    t = table.shape[0]
    # Table rows/cols of every pixel centre ([2, S]); indices outside [0, t) fall on the table's border cells
    # under take(mode="clip"), and those are outside every shape.
    k = t / (2 * _TABLE_EXTENT * radius)
    idx = (_pixel_centres(size)[0] * k - np.array([[cy * k - t / 2], [cx * k - t / 2]])).astype(np.intp)
    inside = table.take(idx[0, y0:y1], 0, mode="clip").take(idx[1, x0:x1], 1, mode="clip")
    np.copyto(image[:, y0:y1, x0:x1], np.array(rgb, np.float32)[:, None, None], where=inside)
    mask[y0:y1, x0:x1][inside] = cls + 1


def make_example(split: str, index: int, image_size: int = 32, classes: tuple[int, ...] | None = None) -> dict:
    """One example, deterministic in (split, index) (and `classes`: the labels the main shape is drawn from).

    Returns {"image": uint8 [S, S, 3], "mask": uint8 [S, S] (see module docstring), "label": int in [0, 64),
    "caption_noisy": str, "caption_synthetic": str, "index": int}.
    """
    image_size = _check_image_size(image_size)
    rng = _rng(split, index)
    u = _uniforms(rng)
    layout = _layout(u, classes)
    image, grain_amp = _background(u[_BACKGROUND], image_size)
    mask = np.zeros((image_size, image_size), np.uint8)
    for cls, dcx, dcy, r, rgb in layout.distractors:
        _draw(image, mask, cls, dcx, dcy, r, rgb)
    _draw(image, mask, layout.label, layout.cx, layout.cy, layout.radius, layout.rgb)
    # Grain over everything (shapes included), so no colour is a single RGB point. No clipping needed: the
    # background stays in [2, 140 + _MAX_GRAIN] and shape colours in [0, 255 - _MAX_GRAIN] (_jitter_rgb).
    grain = np.frombuffer(rng.randbytes(image_size * image_size), np.uint8).reshape(image_size, image_size)
    image += grain * np.float32(grain_amp / 256)
    return {
        "image": image.transpose(1, 2, 0).astype(np.uint8, order="C"),
        "mask": mask,
        "label": layout.label,
        "caption_noisy": layout.caption_noisy,
        "caption_synthetic": layout.caption_synthetic,
        "index": int(index),
    }


class ShapesSource:
    """grain RandomAccessDataSource over one split: ``len(source)`` examples, ``source[i] == make_example(...)``.

    Stateless and picklable (holds only split, length and image size).
    """

    def __init__(self, split: str, num_examples: int | None = None, image_size: int = 32,
                 classes: tuple[int, ...] | None = None):
        _check_split(split)
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        self.image_size = _check_image_size(image_size)
        if num_examples is None:
            num_examples = SPLIT_SIZES[split]
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r}")
        self.split = split
        self.num_examples = int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, record_key: int) -> dict:
        key = int(record_key)
        if not 0 <= key < self.num_examples:
            raise IndexError(f"record_key {record_key} out of range [0, {self.num_examples}) for split {self.split!r}")
        return make_example(self.split, key, self.image_size, self.classes)

    def __repr__(self) -> str:
        return f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, image_size={self.image_size})"


# ---------------------------------------------------------------------------------------- prompts and stats

def class_prompts(class_name: str) -> list[str]:
    """Zero-shot prompt ensemble for one class, in the captions' styles: 12 synthetic + 4 noisy-style prompts."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown class {class_name!r}; valid classes are '<colour> <shape>' with colour in "
                         f"{COLOURS} and shape in {SHAPES}")
    prompts = [f"a {size} {class_name} in the {pos}" for size in SIZES for pos in POSITIONS]
    colour, shape = class_name.split(" ", 1)
    return prompts + [class_name, f"{shape} {colour}", f"{class_name} photo", f"img {class_name}"]


def all_captions(split: str, n: int) -> list[str]:
    """Captions of examples 0..n-1 of a split, both kinds interleaved: [noisy_0, synthetic_0, noisy_1, ...].

    Draws only the layout (no pixels), so it is cheap enough for tokenizer training.
    """
    out: list[str] = []
    for i in range(n):
        layout = _layout(_uniforms(_rng(split, i)))
        out += [layout.caption_noisy, layout.caption_synthetic]
    return out


def distinct_caption_count(split: str, n: int, kind: str = "synthetic") -> int:
    """Number of distinct caption texts among examples 0..n-1 of a split; kind is "synthetic" or "noisy"."""
    kinds = ("noisy", "synthetic")
    if kind not in kinds:
        raise ValueError(f"unknown caption kind {kind!r}; valid kinds: {kinds}")
    return len(set(all_captions(split, n)[kinds.index(kind)::2]))


def colour_histogram(images: np.ndarray, bins: int = 4) -> np.ndarray:
    """Normalised joint RGB histograms [N, bins**3] of uint8 images [N, H, W, 3]."""
    q = (images.astype(np.int64) * bins) >> 8
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    codes = codes.reshape(len(images), -1) + np.arange(len(images))[:, None] * bins ** 3
    hist = np.bincount(codes.ravel(), minlength=len(images) * bins ** 3).reshape(len(images), bins ** 3)
    return hist / hist.sum(axis=1, keepdims=True)


def colour_histogram_baseline(n_train: int, n_eval: int, image_size: int = 32) -> float:
    """Top-1 accuracy of a 4x4x4 RGB-histogram nearest-centroid classifier (centroids from train examples
    0..n_train-1, evaluated on validation examples 0..n_eval-1). Chance is 1/64; low values mean the class
    cannot be read off the colour statistics."""
    def load(split: str, n: int):
        examples = [make_example(split, i, image_size) for i in range(n)]
        return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])

    train_x, train_y = load("train", n_train)
    eval_x, eval_y = load("validation", n_eval)
    train_h, eval_h = colour_histogram(train_x), colour_histogram(eval_x)
    classes = np.unique(train_y)
    centroids = np.stack([train_h[train_y == c].mean(axis=0) for c in classes])
    dist = ((eval_h[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return float((classes[dist.argmin(axis=1)] == eval_y).mean())
