"""SentencePiece tokenizer wrapper with fixed special ids, and deterministic tokenizer training.

Conventions every vlp tokenizer follows (``train_sentencepiece`` sets them; ``Tokenizer`` checks them):
pad = 0, unk = 1, no bos, eos = vocab_size - 1 (the highest id, so Hugging Face CLIP exports, which pool the text
tower at the argmax id, pool at the first eos). ``encode`` returns pieces, truncated to ``max_len - 1``, then one
eos, then pad. The masked-language-modelling id ``mask_id`` = vocab_size lies outside the vocabulary: encode never
returns it, the tokenizer file and the exported towers (which never see masked text) stay as they are, and only
models trained with MLM (vlp.data.mlm) widen their embedding table by one row for it.

The bundled model (``assets/shapes_sp.model``) is a BPE model with 384 pieces trained on captions of the shapes
dataset, in which every caption word is a single piece (unseen words fall back to sub-words and characters). Its
normaliser is ``nmt_nfkc_cf`` (NFKC + case folding), so "Red Circle" and "red circle" encode the same.
"""

from __future__ import annotations

import importlib.resources
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BUNDLED_MODEL = "shapes_sp.model"
SHAPES_VOCAB_SIZE = 384  # all 75 caption words become pieces from ~300 up; BPE on this corpus tops out at ~550
SHAPES_TRAIN_EXAMPLES = 20_000  # 40k captions: every word and synonym seen hundreds of times; trains in < 1 s


def _bundled_model_proto() -> bytes:
    return importlib.resources.files("vlp.data").joinpath("assets", BUNDLED_MODEL).read_bytes()


class Tokenizer:
    """Batch text -> int32 ids [N, max_len] with the conventions above.

    Picklable for grain worker processes: it holds the serialized model and loads the SentencePieceProcessor
    lazily in each process.
    """

    def __init__(self, model_path: str | None = None):
        if model_path is None:
            self._model_proto = _bundled_model_proto()
            self.model_path = f"<bundled {BUNDLED_MODEL}>"
        else:
            path = Path(model_path)
            if not path.is_file():
                raise ValueError(f"tokenizer model {model_path!r} does not exist; pass a SentencePiece .model file "
                                 "(e.g. from tools/train_tokenizer.py) or None for the bundled shapes model")
            self._model_proto = path.read_bytes()
            self.model_path = str(path)
        self._sp: spm.SentencePieceProcessor | None = None
        sp = self._processor()
        self.vocab_size: int = sp.get_piece_size()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()
        self.eos_id: int = sp.eos_id()
        # One past the vocabulary (see the module doc); special_ids are never MLM-masked.
        self.mask_id: int = self.vocab_size
        self.special_ids: tuple[int, ...] = (self.pad_id, self.eos_id)
        if self.pad_id != PAD_ID or self.eos_id != self.vocab_size - 1:
            raise ValueError(
                f"tokenizer {self.model_path} has pad_id={self.pad_id}, eos_id={self.eos_id}, vocab_size="
                f"{self.vocab_size}; vlp needs pad_id=0 and eos_id=vocab_size-1 ({self.vocab_size - 1}): retrain it "
                "with vlp.data.tokenizer.train_sentencepiece")

    def _processor(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        return self._sp

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_sp"] = None  # the C++ processor is not picklable; reloaded on first use
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path}, vocab_size={self.vocab_size})"

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int32 [N, max_len]: each text's pieces (at most max_len - 1), then eos, then pad (0)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (room for eos), got {max_len}")
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        for row, pieces in zip(out, self._processor().encode(list(texts))):
            pieces = pieces[: max_len - 1]
            row[: len(pieces)] = pieces
            row[len(pieces)] = self.eos_id
        return out

    def decode(self, ids) -> str:
        """Text of one id sequence [L] (list or array); stops at the first eos and drops padding."""
        ids = np.asarray(ids).reshape(-1).tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._processor().decode([i for i in ids if i != self.pad_id])


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *, model_type: str = "bpe",
                        character_coverage: float = 0.9995, **options) -> str:
    """Trains a SentencePiece model with vlp's special ids; returns the path of ``{model_prefix}.model``.

    Deterministic: one thread, no sentence sampling or shuffling, and the model is serialised in memory (so the
    output path is not recorded in it): the same texts give a byte-identical file. Also writes
    ``{model_prefix}.vocab`` (piece, score per line). Extra ``options`` go to SentencePieceTrainer.
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (pad, unk, eos and one piece), got {vocab_size}")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=writer, model_type=model_type, vocab_size=vocab_size,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=vocab_size - 1, character_coverage=character_coverage,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, normalization_rule_name="nmt_nfkc_cf",
            minloglevel=2, **options)
    except RuntimeError as e:
        # With eos pinned to the last id, a vocab larger than the corpus supports fails with an opaque check.
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}, model_type={model_type!r}: "
                         f"{e}. If the corpus is small, try a smaller vocab_size.") from e
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(writer.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=writer.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    Path(f"{model_prefix}.vocab").write_text(vocab, encoding="utf-8")
    return str(model_path)


def build_shapes_tokenizer(out_dir: str | Path, num_examples: int = SHAPES_TRAIN_EXAMPLES,
                           vocab_size: int = SHAPES_VOCAB_SIZE) -> str:
    """Trains the bundled tokenizer from the shapes train captions (both kinds); returns the .model path.

    ``build_shapes_tokenizer("vlp/data/assets")`` regenerates the committed asset byte for byte.
    """
    from vlp.data import sources  # local: the tokenizer itself does not depend on the datasets

    texts = sources.all_captions("shapes", "train", num_examples)
    return train_sentencepiece(texts, str(Path(out_dir) / Path(BUNDLED_MODEL).stem), vocab_size,
                               model_type="bpe", character_coverage=1.0)


def load_tokenizer(path: str | None = None):
    """`Tokenizer` for a sentencepiece .model (or None: the bundled one); `HFTokenizer` for a Hugging Face
    tokenizer.json. Both encode a batch to int32 [N, max_len] the same way and pickle for grain workers."""
    if path and str(path).endswith(".json"):
        from vlp.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return Tokenizer(path)
