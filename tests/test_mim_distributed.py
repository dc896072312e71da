"""Masked-image objectives on 2 processes: a short TIPS run (block masks drawn per example, both captions, EMA teacher
and centres, so it covers what SimMIM/MAE add over CLIP too) on 2 processes x 2 CPU devices logs the same per-step
losses as 1 process x 4 devices (rel 1e-5). Launched like the CLIP runs of test_distributed.py, with its helpers."""

import sys

from test_distributed import LAUNCHER, clean_env, rel_diff, run, train_losses, without_evals

STEPS = 5
SHRINK = [
    f"--config.total_steps={STEPS}", "--config.batch_size=16", "--config.log_every=1", "--config.eval_every=1000",
    "--config.checkpoint_every=1000", "--config.optim.warmup_steps=1", "--config.model.embed_dim=32",
    "--config.model.image.patch_size=8",
    *(f"--config.model.{tower}.{key}={value}" for tower in ("image", "text")
      for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))),
    *(f"--config.mim.{key}={value}" for key, value in (("decoder_width", 32), ("decoder_heads", 2),
                                                       ("decoder_mlp_dim", 64), ("min_block", 2))),
    "--config.evals.dense.num_examples=16", "--config.evals.dense.train_examples=16",
    "--config.evals.dense.batch_size=16",
]
TIPS = [
    *(f"--config.distill.{key}={value}" for key, value in (("num_prototypes", 64), ("head_hidden", 32),
                                                           ("head_bottleneck", 16), ("head_layers", 2),
                                                           ("teacher_temp_warmup_steps", 4))),
    *(f"--config.evals.{name}.{key}=16" for name in ("zeroshot", "retrieval", "retrieval_cls2")
      for key in ("num_examples", "batch_size")),
]


def test_tips_on_two_processes_trains_like_one_process(tmp_path):
    args = ["--config=configs/tips.py:tiny", *SHRINK, *TIPS]
    cache = tmp_path / "jax_cache"
    run(["bash", str(LAUNCHER), "2", f"--workdir={tmp_path / 'two'}", *args], clean_env(cache, 2), 300)
    # Only the losses are compared: the reference run skips the final evals (the 2-process run still runs them).
    run([sys.executable, "-m", "vlp.train", f"--workdir={tmp_path / 'one'}", *without_evals(args)],
        clean_env(cache, 4), 300)
    expected, got = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), (sorted(got), sorted(expected))
    assert len(set(expected.values())) == STEPS  # real, changing losses
    for step in expected:
        assert rel_diff(got[step], expected[step]) <= 1e-5, (step, got[step], expected[step])
