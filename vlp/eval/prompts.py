"""Class names and prompt templates for zero-shot classification, by bundled name or from a text file.

Bundled (in vlp/eval/assets/): class names `imagenet1k`; templates `clip80` (the CLIP paper's 80 ImageNet
templates), `clip7` (the 7 of CLIP's prompt-engineering notebook), `siglip` ("This is a photo of {}.") and `name`
(the bare class name, for prompt learning's learned context).
A file holds one entry per line; blank lines and lines starting with `#` are ignored; a template contains `{}`
where the class name goes.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

BUNDLED_CLASS_NAMES = {"imagenet1k": "imagenet1k_classnames.txt"}
BUNDLED_TEMPLATES = {"clip80": "templates_clip80.txt", "clip7": "templates_clip7.txt",
                     "siglip": "templates_siglip.txt", "name": "templates_name.txt"}


def _read_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _load(spec: str, bundled: dict[str, str], what: str) -> list[str]:
    if spec in bundled:
        text = importlib.resources.files("vlp.eval").joinpath("assets", bundled[spec]).read_text()
    elif Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8")
    else:
        raise ValueError(f"{what} {spec!r} is neither a bundled set nor a file; valid: {sorted(bundled)} or the "
                         f"path of a text file with one entry per line")
    entries = _read_lines(text)
    if not entries:
        raise ValueError(f"{what} {spec!r} has no entries (one per line; '#' starts a comment)")
    return entries


def load_class_names(spec: str) -> list[str]:
    """A bundled class-name list (`imagenet1k`) or a file of class names in label order."""
    return _load(spec, BUNDLED_CLASS_NAMES, "class names")


def load_templates(spec: str) -> list[str]:
    """A bundled template set (`clip80`, `clip7`, `siglip`) or a file of templates, each with one `{}`."""
    templates = _load(spec, BUNDLED_TEMPLATES, "prompt templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt templates {spec!r}: each needs exactly one '{{}}' for the class name; these do "
                         f"not: {bad[:3]}")
    return templates


def fill_templates(templates: list[str], class_names: list[str]) -> list[list[str]]:
    """[[template.format(name) for template] for name]: one prompt ensemble per class."""
    return [[t.replace("{}", name) for t in templates] for name in class_names]
