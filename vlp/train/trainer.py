"""The one training loop: config -> mesh -> objective -> sharded state -> jit(train_step) -> metrics, evals,
checkpoints -> final metrics. Every objective and every device count runs through here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from vlp import config as vlp_config
from vlp.data import pipeline, sources
from vlp.data.transforms import SelectCaption, TokenizeBatch
from vlp.objectives import get_objective
from vlp.objectives.base import Objective
from vlp.parallel import mesh as mesh_lib
from vlp.parallel import sharding
from vlp.train import accumulation, evaluation
from vlp.train.checkpoint import Checkpointer
from vlp.train.metrics import MetricWriter, peak_flops_per_device, progress_line, say, to_python
from vlp.train.optim import make_optimizer
from vlp.train.state import TrainState
from vlp.train.workdir import prepare_workdir, write_run_files


class NonFiniteLossError(FloatingPointError):
    """Raised under nan_policy='stop' when a step's loss or gradient is NaN/inf."""


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: sharding.LogicalRules) -> Iterator[None]:
    """The mesh and the logical rule table, both needed while tracing models and sharded losses."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before the first step."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: tuple
    objective: Objective
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any

    def context(self):
        return mesh_context(self.mesh, self.rules)

    def init_state(self) -> TrainState:
        init = _init_fn(self.objective, self.optimizer)
        with self.context():
            return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_shardings)(
                jax.random.key(self.config.seed))

    def batch_shardings(self) -> dict[str, NamedSharding]:
        example = self.objective.example_batch(1)
        return {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in example.items()}


def _init_fn(objective: Objective, optimizer: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    def init(rng: jax.Array) -> TrainState:
        params = objective.init(rng)  # boxed: the optimizer state inherits the params' logical names
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return init


def check_batch_divisibility(batch_size: int, mesh: Mesh, process_count: int, accumulation_steps: int = 1) -> None:
    shards = mesh_lib.batch_shard_count(mesh)
    if batch_size % shards:
        raise ValueError(f"invalid config: batch_size={batch_size} is not divisible by data x fsdp = {shards} "
                         f"(mesh {dict(mesh.shape)}); use a multiple of {shards}")
    if batch_size % (shards * accumulation_steps):
        raise ValueError(f"invalid config: batch_size={batch_size} cannot be split into accumulation.steps="
                         f"{accumulation_steps} micro-batches over data x fsdp = {shards} devices; use a multiple "
                         f"of {shards * accumulation_steps}")
    if batch_size % process_count:
        raise ValueError(f"invalid config: batch_size={batch_size} is not divisible by the process count "
                         f"{process_count}")


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    vlp_config.validate(config)
    mesh = mesh_lib.make_mesh(config.mesh.shape, config.mesh.num_devices)
    check_batch_divisibility(config.batch_size, mesh, jax.process_count(), config.accumulation.steps)
    rules = sharding.as_rules(config.sharding_rules)
    objective = get_objective(config.objective)(config)
    optimizer, schedule = make_optimizer(config.optim, config.total_steps)
    with mesh_context(mesh, rules):
        boxed = jax.eval_shape(_init_fn(objective, optimizer), jax.random.key(config.seed))
        state_shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  sharding.strip_boxes(boxed), state_shardings)
    return Experiment(config, mesh, rules, objective, optimizer, schedule, state_shardings, abstract_state)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    seed: int, accumulation_steps: int = 1,
                    accumulation_mode: str = "gradcache") -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A pure step. A non-finite loss or gradient leaves params and optimizer state unchanged (`nonfinite` = 1).

    `accumulation_steps` > 1 splits the global batch into micro-batches (see vlp/train/accumulation.py).
    """
    grad_fn = accumulation.make_grad_fn(objective, accumulation_steps, accumulation_mode)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep_if_finite(params, state.params),
                               opt_state=keep_if_finite(opt_state, state.opt_state))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       nonfinite=1 - finite.astype(jnp.int32))
        return new_state, metrics

    return train_step


def jit_train_step(exp: Experiment) -> Callable:
    config = exp.config
    step = make_train_step(exp.objective, exp.optimizer, exp.schedule, config.seed, config.accumulation.steps,
                           config.accumulation.mode)
    return jax.jit(step, in_shardings=(exp.state_shardings, exp.batch_shardings()),
                   out_shardings=(exp.state_shardings, None), donate_argnums=(0,))


def make_train_iterator(config: ml_collections.ConfigDict, objective: Objective):
    if config.data.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
    source = sources.make_source(config.data.source, "train", config.data.image_size)
    select = SelectCaption(config.data.train_caption, config.seed, config.data.synthetic_caption_prob)
    tokenize = TokenizeBatch(objective.tokenizer, config.data.max_text_len)
    spec = pipeline.TrainStreamSpec(config.batch_size, config.seed, jax.process_index(), jax.process_count(),
                                    config.data.worker_count, config.data.read_threads)
    return iter(pipeline.make_train_dataset(source, select, tokenize, spec))


class _Throughput:
    """Samples/s, data-wait share and ETA over each log interval; time spent in evals and saves is excluded."""

    def __init__(self, batch_size: int, total_steps: int):
        self.batch_size, self.total_steps = batch_size, total_steps
        self.reset(0)

    def reset(self, step: int) -> None:
        self.start_time, self.start_step, self.data_seconds = time.perf_counter(), step, 0.0

    def summary(self, step: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start_time, 1e-9)
        steps_per_second = (step - self.start_step) / seconds
        return {
            "samples_per_second": steps_per_second * self.batch_size,
            "data_wait_fraction": self.data_seconds / seconds,
            "eta_seconds": (self.total_steps - step) / max(steps_per_second, 1e-9),
        }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates, writes final_metrics.json."""
    workdir = prepare_workdir(workdir)
    exp = build_experiment(config)
    write_run_files(workdir, config)
    say(f"objective {config.objective} | mesh {dict(exp.mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | batch {config.batch_size} | "
        f"workdir {workdir}")

    data_iter = make_train_iterator(config, exp.objective)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                async_save=config.async_checkpointing)
    if checkpointer.latest_step() is not None:
        start_step, state = checkpointer.restore(exp.abstract_state, data_iter)
        say(f"resumed from checkpoint step {start_step}")
    else:
        start_step, state = 0, exp.init_state()
    with exp.context():
        evaluators = evaluation.build_evaluators(config, exp.objective, exp.mesh)
    train_step = jit_train_step(exp)
    writer = MetricWriter(workdir)
    flops_per_example = exp.objective.train_flops_per_example()
    peak = peak_flops_per_device(jax.devices()[0], config.hardware.peak_flops_per_device)
    loop_start = time.perf_counter()
    try:
        with exp.context():
            state, metrics = _train_loop(exp, state, start_step, data_iter, train_step, checkpointer, evaluators,
                                         writer, flops_per_example, peak)
            train_seconds = time.perf_counter() - loop_start
            if checkpointer.latest_step() != config.total_steps:
                checkpointer.save(config.total_steps, state, data_iter, force=True)
            results = evaluation.run_evaluators(evaluators, state.params)
            writer.write(config.total_steps, results)
    finally:  # also on errors: finish pending async saves, stop grain workers, flush metrics
        checkpointer.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
        writer.close()
    final = dict(sorted(results.items()), steps=config.total_steps, train_seconds=round(train_seconds, 2),
                 resumed_from_step=start_step)
    if metrics:
        final["final_loss"] = float(metrics["loss"])
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        print(json.dumps(final), flush=True)
    return final


def _train_loop(exp: Experiment, state: TrainState, start_step: int, data_iter: Any, train_step: Callable,
                checkpointer: Checkpointer, evaluators: dict, writer: MetricWriter, flops_per_example: float,
                peak: float | None) -> tuple[TrainState, dict]:
    """Steps start_step..total_steps with logging, periodic checkpoints and evals; returns (state, last metrics)."""
    config = exp.config
    throughput = _Throughput(config.batch_size, config.total_steps)
    nonfinite_total = jnp.zeros((), jnp.int32)
    metrics: dict[str, Any] = {}
    for step in range(start_step, config.total_steps):
        data_start = time.perf_counter()
        batch = sharding.host_to_global(next(data_iter), exp.mesh)
        throughput.data_seconds += time.perf_counter() - data_start
        state, metrics = train_step(state, batch)
        nonfinite_total = nonfinite_total + metrics["nonfinite"]
        done = step + 1
        if done == start_step + 1:  # exclude compilation from the first interval's throughput
            jax.block_until_ready(state)
            throughput.reset(done)
        if done % config.log_every == 0 or done == config.total_steps:
            logged = to_python(metrics)
            logged["nonfinite_steps"] = float(nonfinite_total)
            check_finite(config.nan_policy, done, logged)
            if done > throughput.start_step:
                logged.update(throughput.summary(done))
                if peak:
                    logged["mfu"] = flops_per_example * logged["samples_per_second"] / (peak * jax.device_count())
            writer.write(done, logged)
            say(progress_line(done, config.total_steps, logged))
            throughput.reset(done)
        if done % config.checkpoint_every == 0 and done != config.total_steps:
            checkpointer.save(done, state, data_iter)
            throughput.reset(done)
        if done % config.eval_every == 0 and done != config.total_steps:
            results = evaluation.run_evaluators(evaluators, state.params)
            writer.write(done, results)
            say("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
            throughput.reset(done)
    return state, metrics


def check_finite(policy: str, step: int, logged: dict[str, float]) -> None:
    if logged["nonfinite_steps"] and policy == "stop":
        bad = [k for k, v in logged.items() if k.startswith("loss") and not math.isfinite(v)]
        raise NonFiniteLossError(
            f"non-finite loss or gradient: {int(logged['nonfinite_steps'])} step(s) up to step {step} were not "
            f"applied (non-finite terms at step {step}: {bad or 'gradient'}); set nan_policy='skip' to go on")
