"""A Hugging Face `tokenizer.json` (e.g. the CLIP BPE tokenizer of a CLIPModel folder) behind vlp's tokenizer API.

Imported weights must see the tokens they were trained on, so the file's own normaliser, pre-tokeniser, model and
post-processor (CLIP: <|startoftext|> ... <|endoftext|>) run unchanged. `encode` keeps vlp's layout: the encoded
ids truncated so that the end-of-text id stays last, then padding. Special ids come from the file: eos is the
first of `EOS_TOKENS` in its vocabulary; pad is its padding token, else the first of `PAD_TOKENS`, else eos (as
OpenAI CLIP pads); begin is the first of `BOS_TOKENS`, if any; the MLM mask id is the file's mask token (`MASK_TOKENS`),
else vocab_size (one past the vocabulary, as vlp.data.tokenizer). The `tokenizers` library is imported lazily (pip install 'vlp[interop]').
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EOS_TOKENS = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")
BOS_TOKENS = ("<|startoftext|>", "<s>", "[CLS]", "<bos>")
MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("a Hugging Face tokenizer.json needs the `tokenizers` package: pip install tokenizers "
                          "(or pip install 'vlp[interop]')") from e
    return tokenizers


class HFTokenizer:
    """Batch text -> int32 ids [N, max_len] with a tokenizer.json; picklable (holds the JSON, loads lazily)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist; pass a Hugging Face tokenizer.json")
        self.model_path = str(path)
        self._json = path.read_text(encoding="utf-8")
        self._tok = None
        tok = self._backend()
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in EOS_TOKENS if t in vocab), None)
        if eos is None:
            raise ValueError(f"tokenizer {self.model_path} has none of the end-of-text tokens {EOS_TOKENS}")
        self.eos_id: int = vocab[eos]
        padding = json.loads(self._json).get("padding") or {}
        pad = padding.get("pad_token") or next((t for t in PAD_TOKENS if t in vocab), eos)
        self.pad_id: int = vocab.get(pad, self.eos_id)
        self.unk_id: int | None = None
        bos = next((t for t in BOS_TOKENS if t in vocab), None)
        self.bos_id: int | None = None if bos is None else vocab[bos]
        mask = next((t for t in MASK_TOKENS if t in vocab), None)
        self.mask_id: int = self.vocab_size if mask is None else vocab[mask]
        # Never MLM-masked (vlp.data.mlm): padding, end and begin of text.
        self.special_ids: tuple[int, ...] = tuple(sorted({self.pad_id, self.eos_id}
                                                         | ({self.bos_id} if bos is not None else set())))

    def _backend(self) -> Any:
        if self._tok is None:
            self._tok = _tokenizers().Tokenizer.from_str(self._json)
            self._tok.no_padding()
            self._tok.no_truncation()
        return self._tok

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tok"] = None  # rebuilt from the JSON on first use in each process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path}, vocab_size={self.vocab_size})"

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int32 [N, max_len]: the file's encoding (special tokens included), cut to max_len with the
        end-of-text id kept last, then pad."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (room for eos), got {max_len}")
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        for row, encoding in zip(out, self._backend().encode_batch(list(texts)), strict=True):
            ids = list(encoding.ids)
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [self.eos_id]
            row[: len(ids)] = ids
        return out

    def decode(self, ids) -> str:
        """Text of one id sequence [L]; stops at the first eos."""
        ids = np.asarray(ids).reshape(-1).tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._backend().decode([i for i in ids if i != self.pad_id], skip_special_tokens=True)
