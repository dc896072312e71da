"""Every script in benchmarks/ runs for one tiny step and prints its JSON line with positive figures, so `make bench`
cannot silently break (e.g. a synthetic batch that no longer matches what the train step expects). Nothing here
asserts on time."""

import json
import os
import subprocess
import sys

from conftest import REPO

TINY_TOWERS = [f"--set=model.{tower}.{key}={value}" for tower in ("image", "text")
               for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))]


def run_json_lines(script: str, *args: str) -> list[dict]:
    """Runs benchmarks/<script> as a user would; returns the JSON objects it printed on stdout."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, f"{script} printed no JSON line:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return rows


def test_train_step_benchmark_runs_one_step():
    [row] = run_json_lines("train_step.py", "--config=configs/clip.py:tiny", *TINY_TOWERS,
                           "--set=model.embed_dim=32", "--set=batch_size=16", "--set=mesh.num_devices=1",
                           "--steps=1", "--warmup=0", "--forward_steps=1", "--peak_matmul_size=256", "--matmul_floor",
                           "--floor_repeats=1")
    assert row["steps"] == 1 and row["batch_size"] == 16 and row["devices"] == 1
    # Every matmul timed alone: 2 per dense layer forward, 2 backward (the input image needs no gradient).
    assert row["matmul_floor_dots"] >= 20 and 0 < row["matmul_floor_seconds"] < 10 * row["step_seconds_median"]
    assert 0 < row["matmul_floor_flops"] <= row["compiled_flops_per_step_per_device"]
    assert row["matmul_floor_untimed_convolutions"] == 2  # the patch embedding and its kernel's gradient
    for key in ("compile_seconds", "step_seconds_mean", "samples_per_second", "model_flops_per_step",
                "compiled_flops_per_step_per_device", "model_tflops_per_second_per_device", "temp_bytes_per_device"):
        assert row[key] > 0, (key, row[key])
    # The analytic FLOP count and XLA's agree to ~10% (test_flops.py checks it at a width where matmuls dominate).
    assert 0.7 <= row["analytic_vs_compiled"] <= 1.3, row["analytic_vs_compiled"]
    assert 0 < row["loss"] < 10  # ~ln 16 + a little at init
    # On CPU the MFU peak is this run's own XLA matmul rate (best of the two measurements), not a table value.
    assert row["peak_source"].startswith("measured") and len(row["measured_peak_tflops"]) == 2
    # (the host's rate, split among the process's CPU devices: 8 virtual ones under conftest)
    host_peak = row["peak_tflops_per_device"] * row["devices_sharing_measured_peak"]
    assert abs(host_peak - max(row["measured_peak_tflops"])) <= 1e-5 * row["devices_sharing_measured_peak"]
    assert host_peak > 0
    peak = row["peak_tflops_per_device"] * 1e12
    mfu = row["model_flops_per_step_per_device"] / row["step_seconds_mean"] / peak
    assert abs(row["mfu"] - mfu) <= 1e-4 + 1e-2 * mfu, (row["mfu"], mfu)
    # The forward pass does 1/3 of the model FLOPs (the rest: backward + update); figures are rounded in the JSON.
    forward_mfu = row["model_flops_per_step_per_device"] / 3 / (peak * row["forward_seconds_median"])
    assert abs(row["forward_mfu"] - forward_mfu) <= 1e-4 + 1e-2 * forward_mfu, (row["forward_mfu"], forward_mfu)


def test_train_step_benchmark_runs_an_objective_with_extra_state():
    # ALBEF: a momentum model and queues in the extra state, a text table with mask/CLS rows above the vocabulary
    [row] = run_json_lines("train_step.py", "--config=configs/albef.py:tiny", *TINY_TOWERS,
                           "--set=model.embed_dim=32", "--set=batch_size=16", "--set=mesh.num_devices=1",
                           "--set=model.text.depth=2", "--set=albef.queue_size=64", "--steps=1", "--warmup=0",
                           "--forward_steps=1",
                           "--peak_matmul_size=256")
    assert row["steps"] == 1 and row["samples_per_second"] > 0 and row["forward_seconds_median"] > 0
    assert 0 < row["loss"] < 20


def test_loss_memory_benchmark_compiles_every_kind_and_variant():
    rows = run_json_lines("loss_memory.py", "--devices=2", "--dim=8", "--batches", "16")
    assert {(r["loss"], r["variant"]) for r in rows} == {("softmax", "gather"), ("softmax", "ring"),
                                                         ("sigmoid", "gather"), ("sigmoid", "ring")}
    for row in rows:
        assert row["global_batch"] == 16 and row["devices"] == 2
        assert row["bytes_per_device"] >= row["temp_bytes_per_device"] > 0, row


def test_data_benchmark_reads_one_batch_in_process_and_with_a_worker():
    [row] = run_json_lines("data.py", "--images=32", "--source_size=64x48", "--image_size=32", "--batch=8",
                           "--batches=1", "--workers=0,1")
    assert row["batch"] == 8 and row["mean_jpeg_kib"] > 0
    assert row["images_per_second_workers_0"] > 0 and row["images_per_second_workers_1"] > 0


def test_decode_benchmark_times_cached_and_uncached_decoding():
    rows = run_json_lines("decode.py", "--config=configs/coca.py:tiny", "--batch=4", "--beams=2", "--repeats=1")
    timed = [r for r in rows if "captions_per_s" in r]
    assert {(r["method"], r["cached"]) for r in timed} == {("greedy", True), ("greedy", False), ("beam", True),
                                                           ("beam", False)}
    assert all(r["captions_per_s"] > 0 and r["tokens_per_s"] > 0 and r["batch"] == 4 for r in timed), timed
    # The KV cache changes the speed, never the tokens.
    assert [r["cached_equals_uncached"] for r in rows if "cached_equals_uncached" in r] == [True, True]
