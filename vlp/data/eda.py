"""EDA text augmentation (Wei & Zou, 2019; jasonwei20/eda_nlp), as CleanCLIP uses it for its in-modal text view.

CleanCLIP calls `eda(caption, alpha_sr=0.1, alpha_ri=0.1, alpha_rs=0.1, p_rd=0.1, num_aug=1)`: EDA makes one
sentence with each of its four operations and keeps one of them at random. So one call here picks one operation
uniformly and applies it with n = max(1, int(alpha * number of words)):
  - synonym replacement: n distinct words that have a synonym get a random one;
  - random insertion: n times, a synonym of a random word is inserted at a random position;
  - random swap: n times, two random positions swap words;
  - random deletion: each word is dropped with probability p (one random word is kept if all would go).
EDA's synonyms come from WordNet, which would be a download; vlp ships a small table instead (`SYNONYMS`: the shapes
vocabulary's synonyms, both ways, and common caption words), passed explicitly so real data can bring its own.
Hand-written because the maintained packages (nlpaug, textaugment) read WordNet through an nltk download.
"""

from __future__ import annotations

import numpy as np

from vlp.data import shapes

OPERATIONS = ("synonym", "insert", "swap", "delete")


def _symmetric(groups: list[tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Every word of each group -> the other words of its group."""
    table: dict[str, set[str]] = {}
    for group in groups:
        for word in group:
            table.setdefault(word, set()).update(w for w in group if w != word)
    return {word: tuple(sorted(others)) for word, others in sorted(table.items())}


_GENERAL = [("photo", "picture", "image", "pic"), ("small", "tiny", "little"), ("large", "big", "huge"),
            ("upper", "top"), ("lower", "bottom"), ("left", "leftmost"), ("right", "rightmost"),
            ("in", "at"), ("a", "one")]
SYNONYMS: dict[str, tuple[str, ...]] = _symmetric(
    _GENERAL + [(c, *s) for c, s in shapes.COLOUR_SYNONYMS.items()]
    + [(s, *(x for x in syn if " " not in x)) for s, syn in shapes.SHAPE_SYNONYMS.items()])


def eda(text: str, rng: np.random.Generator, alpha_sr: float = 0.1, alpha_ri: float = 0.1, alpha_rs: float = 0.1,
        p_rd: float = 0.1, synonyms: dict[str, tuple[str, ...]] | None = None) -> str:
    """One EDA augmentation of `text` (whitespace-split words), drawn from `rng` (see the module docstring)."""
    synonyms = SYNONYMS if synonyms is None else synonyms
    words = text.split()
    if not words:
        return text
    operation = OPERATIONS[int(rng.integers(len(OPERATIONS)))]
    alpha = {"synonym": alpha_sr, "insert": alpha_ri, "swap": alpha_rs}.get(operation, 0.0)
    n = max(1, int(alpha * len(words)))
    if operation == "synonym":
        candidates = [i for i, w in enumerate(words) if w in synonyms]
        for i in rng.permutation(candidates)[:n] if candidates else []:
            options = synonyms[words[i]]
            words[i] = options[int(rng.integers(len(options)))]
    elif operation == "insert":
        for _ in range(n):
            with_synonyms = [w for w in words if w in synonyms]
            if not with_synonyms:
                break
            options = synonyms[with_synonyms[int(rng.integers(len(with_synonyms)))]]
            words.insert(int(rng.integers(len(words) + 1)), options[int(rng.integers(len(options)))])
    elif operation == "swap":
        for _ in range(n if len(words) > 1 else 0):
            i, j = rng.integers(len(words), size=2)
            words[i], words[j] = words[j], words[i]
    else:
        kept = [w for w in words if rng.random() >= p_rd]
        words = kept or [words[int(rng.integers(len(words)))]]
    return " ".join(words)
