"""tools/caption.py and the `captioning` evaluator end to end on a (2-step) CoCa run: a folder of images in, one
JSON line per readable image out, unreadable files skipped and listed, beam search with one beam equal to greedy,
and the evaluator's scores in their ranges, during training and from tools/eval.py."""

import json

import ml_collections
import numpy as np
import pytest
from conftest import load_tool
from PIL import Image
from test_coca import coca_config

from vlp.data import sources
from vlp.eval.captioning import default_eval
from vlp.train.trainer import train_and_evaluate

SCORES = ("captioning_cider", "captioning_bleu4", "captioning_exact_match")


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("coca") / "run"
    config = coca_config(**{"total_steps": 2, "log_every": 1, "checkpoint_every": 2, "eval_every": 1000,
                            "optim.warmup_steps": 1, "async_checkpointing": False})
    with config.unlocked():
        config.evals = ml_collections.ConfigDict({"captioning": default_eval(num_examples=8, batch_size=8)})
    final = train_and_evaluate(config, workdir)
    return workdir, final


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    source = sources.make_source("shapes", "test", 48)  # larger than the model's 32 px: resized and center-cropped
    for i in range(3):
        Image.fromarray(source[i]["image"]).save(folder / f"shape_{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_training_reports_captioning_scores(coca_run):
    _, final = coca_run
    assert 0 <= final["captioning_cider"] <= 10 and 0 <= final["captioning_bleu4"] <= 1
    assert 0 <= final["captioning_exact_match"] <= 1


def test_caption_tool_writes_a_line_per_readable_image(coca_run, image_dir, tmp_path):
    workdir, _ = coca_run
    caption = load_tool("caption")
    greedy = caption.main([f"--workdir={workdir}", f"--image_dir={image_dir}", f"--out={tmp_path / 'greedy.jsonl'}"])
    beam = caption.main([f"--workdir={workdir}", f"--image_dir={image_dir}", f"--out={tmp_path / 'beam.jsonl'}",
                         "--decode=beam", "--beams=1", "--length_penalty=0"])
    assert greedy["step"] == 2 and greedy["captions"] == beam["captions"] == 3
    assert len(greedy["skipped"]) == 1 and "broken.png" in greedy["skipped"][0]
    rows = [json.loads(line) for line in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in rows) == ["shape_0.png", "shape_1.png", "shape_2.png"]
    assert all(isinstance(r["caption"], str) for r in rows)
    # One beam without a length penalty is greedy decoding, through the tool's whole path.
    assert (tmp_path / "beam.jsonl").read_text() == (tmp_path / "greedy.jsonl").read_text()


def test_eval_tool_scores_captions_of_a_checkpoint(coca_run):
    workdir, final = coca_run
    results = load_tool("eval").main([f"--workdir={workdir}", "--evals=captioning",
                                      "--set", "evals.captioning.num_examples=8",
                                      "--set", "evals.captioning.batch_size=8"])
    scores = {k: v for k, v in results.items() if k in SCORES}
    assert sorted(scores) == sorted(SCORES)
    # The same checkpoint, the same 8 images and greedy decoding: the numbers the run reported at its end.
    np.testing.assert_allclose([scores[k] for k in SCORES], [final[k] for k in SCORES], rtol=1e-6)
