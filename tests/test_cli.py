"""End to end through the command line: train, kill -9, resume, evaluate, export, plot."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from safetensors.numpy import load_file

from vlp.data.shapes import make_example

SMALL = ["--config.model.image.width=32", "--config.model.image.depth=1", "--config.model.image.mlp_dim=64",
         "--config.model.image.num_heads=2", "--config.model.text.width=32", "--config.model.text.depth=1",
         "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2", "--config.model.embed_dim=32",
         "--config.batch_size=16", "--config.optim.warmup_steps=2", "--config.log_every=5",
         "--config.checkpoint_every=5", "--config.evals.zeroshot.num_examples=64",
         "--config.evals.retrieval.num_examples=64", "--config.mesh.num_devices=1"]


def env():
    # One device (without the session's 8-device flag) but with its fast-compile flags: every run and tool here
    # compiles under the same flags, so the exact comparisons between runs hold as before.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=" ".join(flags))


def train_cmd(workdir, steps):
    # A constant learning rate after warmup: the killed run (400 steps) and the resumed one (40) share a schedule.
    return [sys.executable, "-m", "vlp.train", "--config=configs/clip.py:tiny", f"--workdir={workdir}",
            f"--config.total_steps={steps}", "--config.optim.schedule=constant", *SMALL]


def logged_losses(workdir) -> dict[int, float]:
    """Step -> logged training loss; a step logged twice (by the killed run, then by the resumed one) keeps the
    later record."""
    from vlp.train.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


def run(cmd):
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_train_kill_resume_eval_export_plot(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(workdir, 400), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "checkpoints" / "10").is_dir():
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (workdir / "checkpoints" / "10").is_dir(), "no checkpoint was written before the kill"

    stdout = run(train_cmd(workdir, 40))
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["resumed_from_step"] >= 10 and final["steps"] == 40
    # Exact reproduction: the resumed steps log the very losses of an uninterrupted run with the same settings.
    reference = tmp_path / "uninterrupted"
    run(train_cmd(reference, 40))
    want, got = logged_losses(reference), logged_losses(workdir)
    resumed_steps = [step for step in sorted(want) if step > final["resumed_from_step"]]
    assert resumed_steps and resumed_steps[-1] == 40, sorted(want)
    assert [got[step] for step in resumed_steps] == [want[step] for step in resumed_steps], (got, want)
    assert final["final_loss"] == json.loads((reference / "final_metrics.json").read_text())["final_loss"]
    for key in ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "steps", "train_seconds"):
        assert key in final
    assert "samples/s" in stdout and "ETA" in stdout
    saved = json.loads((workdir / "final_metrics.json").read_text())
    assert saved == final
    provenance = json.loads((workdir / "provenance.json").read_text())
    assert provenance["device_count"] >= 1 and provenance["packages"]["jax"]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 40

    small_feature_evals = [f"evals.{name}.{key}={value}" for name in ("knn", "linear_probe")
                           for key, value in (("num_train", 256), ("num_examples", 64))]
    printed = run([sys.executable, "tools/eval.py", f"--workdir={workdir}",
                   "--evals=zeroshot,retrieval,knn,linear_probe", "--set", "evals.zeroshot.num_examples=64",
                   *(f"--set={s}" for s in small_feature_evals)])
    evaluated = json.loads(printed.strip().splitlines()[-1])
    assert evaluated["step"] == 40
    assert evaluated["zeroshot_top1"] == pytest.approx(final["zeroshot_top1"])
    assert {"zeroshot_top5", "retrieval_i2t_r10", "retrieval_t2i_r5"} <= set(evaluated)
    # 64 classes, 256 train images (4 per class): a 40-step model's frozen features beat chance (1/64) twice over.
    assert evaluated["knn_top1"] > 2 / 64 and evaluated["linear_probe_top1"] > 2 / 64
    assert any(line.startswith("linear_probe_top5 ") for line in printed.splitlines()[:-1])  # the table

    images = [tmp_path / f"img{i}.png" for i in range(3)]
    for i, path in enumerate(images):
        Image.fromarray(make_example("validation", i, image_size=48)["image"]).save(path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
    summary = json.loads(run([sys.executable, "tools/embed.py", f"--workdir={workdir}", "--images",
                              *map(str, images), str(tmp_path / "broken.jpg"), f"--texts={tmp_path / 'captions.txt'}",
                              f"--out={tmp_path / 'emb.npz'}"]).strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["texts"] == 2 and summary["skipped_images"] == 1
    emb = np.load(tmp_path / "emb.npz")
    assert emb["image_embeddings"].shape == (3, 32) and emb["text_embeddings"].shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb["image_embeddings"], axis=1), 1.0, atol=1e-5)
    assert list(emb["texts"]) == ["a red circle", "a blue square"]

    out_dir = tmp_path / "export"
    run([sys.executable, "tools/export.py", f"--workdir={workdir}", "--format=safetensors", f"--out={out_dir}"])
    tensors = load_file(str(out_dir / "model.safetensors"))
    model_config = json.loads((out_dir / "model_config.json").read_text())
    assert model_config["objective"] == "clip" and model_config["step"] == 40
    assert tensors["image/patch_embed/kernel"].shape == (8, 8, 3, 32)
    assert np.isfinite(tensors["log_logit_scale"]).all()

    png = run([sys.executable, "tools/plot_metrics.py", f"--workdir={workdir}"]).strip().splitlines()[-1]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    bars = run([sys.executable, "tools/plot_metrics.py", "--eval_json", str(workdir / "eval_config_step40.json"),
                f"--out={tmp_path / 'evals.png'}"]).strip().splitlines()[-1]
    assert open(bars, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tool", sorted(str(p.relative_to(REPO)) for folder in ("tools", "benchmarks")
                                         for p in (REPO / folder).glob("*.py") if not p.name.startswith("_")))
def test_tools_have_help(tool):
    out = run([sys.executable, tool, "--help"])
    assert "usage:" in out


def test_unknown_config_flag_fails_at_start(tmp_path):
    out = subprocess.run(train_cmd(tmp_path / "x", 5) + ["--config.optim.learning_rate=0.1"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "learning_rate" in out.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
