"""SentencePiece wrapper: id conventions, padding/truncation, round trips, picklability, deterministic training."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from vlp.data import shapes, tokenizer

ASSET = Path(tokenizer.__file__).parent / "assets" / tokenizer.BUNDLED_MODEL


@pytest.fixture(scope="module")
def tok():
    return tokenizer.Tokenizer()


def test_special_ids(tok):
    assert tok.pad_id == tokenizer.PAD_ID == 0
    assert tok.unk_id == 1
    assert tok.vocab_size == tokenizer.SHAPES_VOCAB_SIZE == 384
    assert tok.eos_id == tok.vocab_size - 1 == 383  # the highest id: HF CLIP pools at argmax(ids)
    sp = spm.SentencePieceProcessor(model_file=str(ASSET))
    assert sp.bos_id() == -1 and sp.id_to_piece(tok.eos_id) == "</s>"


def test_encode_shape_dtype_eos_and_padding(tok):
    texts = ["a large red circle in the upper left", "red circle", ""]
    ids = tok.encode(texts, max_len=12)
    assert ids.shape == (3, 12) and ids.dtype == np.int32
    for row, text in zip(ids, texts):
        n_pieces = len(text.split())  # every caption word is one piece
        first_pad = int(np.argmax(row == 0))
        assert first_pad == n_pieces + 1
        assert row[first_pad - 1] == tok.eos_id and (row[first_pad:] == 0).all()
        assert (row[:n_pieces] != tok.eos_id).all() and (row[:n_pieces] > 1).all()
        assert row.max() == tok.eos_id  # eos is the argmax of every row
    red, circle = tok.encode(["red", "circle"], 2)[:, 0]
    assert ids[1, :3].tolist() == [red, circle, tok.eos_id]


def test_truncation_keeps_eos_last(tok):
    ids = tok.encode(["a large red circle in the upper left"], max_len=5)
    full = tok.encode(["a large red circle in the upper left"], max_len=16)
    np.testing.assert_array_equal(ids[0, :4], full[0, :4])
    assert ids[0, 4] == tok.eos_id and 0 not in ids[0]
    assert tok.encode(["red circle"], max_len=1).tolist() == [[tok.eos_id]]


def test_round_trip_decode(tok):
    captions = shapes.all_captions("validation", 100)
    ids = tok.encode(captions, max_len=16)
    assert [tok.decode(row) for row in ids] == captions
    red, circle = tok.encode(["red", "circle"], 2)[:, 0]
    assert tok.decode([red, circle, tok.eos_id, 5, 0]) == tok.decode(np.array([red, circle])) == "red circle"


def test_every_caption_word_is_one_piece(tok):
    words = sorted({w for c in shapes.all_captions("validation", 2000) for w in c.split()})
    assert len(words) == 75
    ids = tok.encode(words, max_len=3)
    assert (ids[:, 1] == tok.eos_id).all(), [w for w, row in zip(words, ids) if row[1] != tok.eos_id]
    assert (ids[:, 0] != tok.unk_id).all()


def test_case_is_folded_and_unseen_words_do_not_fail(tok):
    np.testing.assert_array_equal(tok.encode(["Red CIRCLE"], 8), tok.encode(["red circle"], 8))
    ids = tok.encode(["a photo of a pink hexagon"], 32)[0]
    assert tok.decode(ids) == "a photo of a pink hexagon"  # sub-word fallback, no unk for a-z


def test_encode_rejects_a_bare_string(tok):
    with pytest.raises(TypeError, match="sequence of texts"):
        tok.encode("red circle", 8)


def test_pickle_reloads_processor_lazily(tok):
    tok.encode(["warm up"], 4)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._sp is None
    np.testing.assert_array_equal(clone.encode(["big blue star top"], 8), tok.encode(["big blue star top"], 8))
    assert clone.vocab_size == tok.vocab_size and clone.eos_id == tok.eos_id


def test_explicit_model_path_matches_bundled(tok):
    from_path = tokenizer.Tokenizer(str(ASSET))
    np.testing.assert_array_equal(from_path.encode(["tiny snow dot"], 6), tok.encode(["tiny snow dot"], 6))
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer.Tokenizer("/nonexistent/model.model")


def test_training_is_deterministic(tmp_path):
    texts = shapes.all_captions("train", 2000)
    a = tokenizer.train_sentencepiece(texts, str(tmp_path / "a" / "m"), vocab_size=200)
    b = tokenizer.train_sentencepiece(iter(texts), str(tmp_path / "b" / "other"), vocab_size=200)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert (tmp_path / "a" / "m.vocab").read_text().splitlines()[0] == "<pad>\t0"
    trained = tokenizer.Tokenizer(a)
    assert trained.vocab_size == 200 and trained.eos_id == 199 and trained.pad_id == 0


def test_bundled_asset_is_reproducible(tmp_path):
    rebuilt = tokenizer.build_shapes_tokenizer(tmp_path)
    assert Path(rebuilt).read_bytes() == ASSET.read_bytes()


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="smaller vocab_size"):
        tokenizer.train_sentencepiece(["red circle", "blue square"] * 20, str(tmp_path / "m"), vocab_size=500)


def test_model_without_vlp_conventions_is_rejected(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shapes.all_captions("train", 200)),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=60, minloglevel=2)
    with pytest.raises(ValueError, match="eos_id=vocab_size-1"):
        tokenizer.Tokenizer(str(tmp_path / "plain.model"))
