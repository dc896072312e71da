"""The CPU MFU peak is measured on this machine (vlp/train/metrics.py), and benchmarks/open_clip_step.py (the torch
side of the side-by-side with train_step.py) runs one tiny step of the same model. Nothing asserts on time."""

import itertools

import jax
import pytest
from test_benchmarks import TINY_TOWERS, run_json_lines

from vlp.train import metrics


def test_measure_matmul_flops_counts_two_n_cubed_per_best_run(monkeypatch):
    # A fake clock: every timed run takes 0.5 s except one of 0.25 s; the best run gives 2 * n^3 / 0.25 FLOP/s.
    durations = iter([0.5, 0.25, 0.5])
    ticks = itertools.count()
    now = [0.0]

    def clock():
        if next(ticks) % 2:
            now[0] += next(durations)
        return now[0]

    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    assert metrics.measure_matmul_flops(jax.devices()[0], size=64, repeats=3) == 2 * 64 ** 3 / 0.25
    with pytest.raises(ValueError, match="size=0"):
        metrics.measure_matmul_flops(jax.devices()[0], size=0)


def test_cpu_peak_is_measured_not_a_table_value(monkeypatch):
    cpu = jax.devices("cpu")[0]
    metrics._measured_cpu_peak.cache_clear()
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, size=1024: 123.0e9)
    # The host's rate, shared by this process's CPU devices (8 virtual ones under conftest).
    assert metrics.peak_flops_per_device(cpu) == 123.0e9 / len(jax.local_devices(backend="cpu"))
    assert metrics.peak_flops_per_device(cpu, override=7e9) == 7e9
    metrics._measured_cpu_peak.cache_clear()
    assert "cpu" not in {k.lower() for k in metrics.PEAK_FLOPS_PER_DEVICE}


def test_matmul_floor_finds_every_dot_of_a_compiled_step_with_its_flops():
    """benchmarks/train_step.py --matmul_floor: each dot of the optimized HLO (YNNPACK fusions included) is found
    with its shapes and dimension numbers; the summed FLOPs are the exact count of the function's matmuls."""
    import sys

    import jax.numpy as jnp
    from test_benchmarks import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step

    b, d, f, t, h = 8, 16, 32, 5, 4

    def loss(w1, w2, q, x, k):  # value and gradients: 3 dots forward, 4 backward (x and k need no gradient)
        return ((jnp.tanh(x @ w1) @ w2) ** 2).sum() + (jnp.einsum("bth,bsh->bts", q, k) ** 2).sum()

    args = [jnp.ones(s) for s in ((d, f), (f, d), (b, t, h), (b, d), (b, t, h))]
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    dots = train_step.hlo_dots(text)
    assert sum(dots.values()) == 7, dots
    assert ("f32", (b, d), (d, f), (((1,), (0,)), ((), ()))) in dots  # x @ w1 as written
    floor = train_step.matmul_floor(dots, repeats=1)
    dense, attention = 2 * b * d * f, 2 * b * t * t * h
    # dense: 2 forward, 3 backward (w2's and w1's gradients, and the gradient into tanh); attention: 1 + 1 (q's)
    assert floor["matmul_floor_flops"] == 5 * dense + 2 * attention
    assert floor["matmul_floor_seconds"] > 0 and floor["matmul_floor_dots"] == 7
    scan = jax.jit(lambda w, x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0])
    with pytest.raises(ValueError, match="loops"):
        train_step.hlo_dots(scan.lower(args[0][:, :d], args[3]).compile().as_text())


def test_open_clip_step_benchmark_builds_the_same_model_and_runs_one_step():
    pytest.importorskip("open_clip")
    [row] = run_json_lines("open_clip_step.py", "--config=configs/clip.py:tiny", *TINY_TOWERS,
                           "--set=model.embed_dim=32", "--set=batch_size=16", "--steps=1", "--warmup=0",
                           "--threads=1")
    assert row["steps"] == 1 and row["batch_size"] == 16 and row["threads"] == 1
    assert row["params"] == row["vlp_params"] > 0  # the same architecture on both sides
    assert row["samples_per_second"] > 0 and row["model_flops_per_step"] > 0
    assert 0 < row["loss"] < 10  # finite: the ClipLoss of random embeddings


def test_cpu_train_step_updates_donated_state_in_place():
    """On CPU the compiled step writes params and optimizer state into the donated buffers: no copy of any state leaf
    (XLA:CPU's default copy insertion copied every Adam moment each step: 79 copies at this size, 319 on
    clip.py:bench)."""
    import re

    from conftest import tiny_config

    from vlp.train.trainer import build_experiment, jit_train_step

    exp = build_experiment(tiny_config())
    state = exp.init_state()
    batch = {k: jax.numpy.asarray(v) for k, v in exp.objective.example_batch(16).items()}
    with exp.context():
        hlo = jit_train_step(exp).lower(state, batch).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    copies = re.findall(r"= \S+ copy\(%?state_\S*\)", entry)
    assert not copies, f"{len(copies)} state copies, e.g. {copies[:3]}"


def test_xla_cpu_threads_benchmark_times_each_op():
    [row] = run_json_lines("xla_cpu_threads.py", "--tokens=64", "--width=32", "--mlp=64", "--repeats=1")
    assert (row["tokens"], row["width"], row["mlp"]) == (64, 32, 64)
    for op in ("matmul", "gelu_exact", "gelu_exact_grad", "layer_norm", "scale_add"):
        assert row[op]["ms"] > 0 and row[op]["cores_busy"] >= 0 and row[op]["gbytes_per_s"] > 0, (op, row[op])
    assert row["matmul"]["gflops"] > 0


def test_xla_cpu_layouts_benchmark_times_each_variant():
    [row] = run_json_lines("xla_cpu_layouts.py", "--batch=2", "--tokens=5", "--width=16", "--features=32",
                           "--heads=2", "--repeats=1")
    assert (row["batch"], row["tokens"], row["width"], row["features"], row["heads"]) == (2, 5, 16, 32, 2)
    for variant in ("rows_3d", "rows_2d"):
        assert row["weight_gradient"][variant]["ms"] > 0, row
    for variant in ("token_major", "head_major_autodiff", "head_major"):
        assert row["attention"][variant]["forward_ms"] > 0 and row["attention"][variant]["forward_backward_ms"] > 0
    assert row["page_faults"]["array_bytes"] == 2 * 5 * 32 * 4
    assert 0 <= row["page_faults"]["minor_faults_per_run_min"] <= row["page_faults"]["minor_faults_per_run_max"]


def test_exact_gelu_is_torch_form_with_erf():
    """Exact GELU as x/2 (1 + erf(x/sqrt 2)) (torch's formula; XLA:CPU's erf is cheaper than jax.nn.gelu's erfc),
    against math.erf in float64 over [-10, 10], value and gradient; bf16 inputs stay bf16."""
    from math import erf, exp, pi, sqrt

    import numpy as np

    from vlp.models import layers

    gelu = layers.activation_fn("gelu")
    assert "erfc" not in jax.jit(gelu).lower(jax.numpy.ones(4)).as_text()
    x = np.linspace(-10, 10, 2001, dtype=np.float32)
    want = [v * 0.5 * (1 + erf(v / sqrt(2))) for v in x.astype(np.float64)]
    want_grad = [0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi) for v in x.astype(np.float64)]
    np.testing.assert_allclose(gelu(x), want, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), want_grad, atol=2e-6, rtol=1e-6)
    assert gelu(jax.numpy.ones(3, jax.numpy.bfloat16)).dtype == jax.numpy.bfloat16
