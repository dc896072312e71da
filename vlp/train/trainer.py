"""The one training loop: config -> mesh -> objective -> sharded state -> jit(train_step) -> metrics, evals,
checkpoints -> final metrics. Every objective and every device count runs through here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from vlp import config as vlp_config
from vlp.data import augment, pipeline, sources
from vlp.data.transforms import SKIPPED_KEY, SelectCaption, TokenizeBatch
from vlp.objectives import get_objective
from vlp.objectives.base import Objective
from vlp.parallel import mesh as mesh_lib
from vlp.parallel import sharding
from vlp.train import accumulation, evaluation, frozen
from vlp.train.checkpoint import Checkpointer, CheckpointWriteError, UnrestorableCheckpointError
from vlp.train.frozen import restore_params
from vlp.train.init_from import load_init_params
from vlp.train.metrics import MetricWriter, peak_flops_per_device, progress_line, say, to_python
from vlp.train.optim import make_optimizer
from vlp.train.paths import write_text_atomic
from vlp.train.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch
from vlp.train.state import TrainState, zero_counters
from vlp.train.watchdog import StepWatchdog
from vlp.train.workdir import check_resume_config, prepare_workdir, write_run_files


class NonFiniteLossError(FloatingPointError):
    """Raised under nan_policy='stop' (or when a rollback is impossible) when a step's loss or gradient is NaN/inf."""


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
        """Shardings of a training batch: the objective's fields and the pipeline's skipped-record counts."""
        example = self.objective.example_batch(1)
        example[SKIPPED_KEY] = np.zeros((1,), np.int32)
        return {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in example.items()}


def _init_fn(objective: Objective, optimizer: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    def init(rng: jax.Array) -> TrainState:
        params = objective.init(rng)  # boxed: the optimizer state inherits the params' logical names
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          extra=objective.init_extra(params), counters=zero_counters())

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
    if objective.has_extra:
        if accumulation_steps != 1:
            raise ValueError(f"invalid config: accumulation.steps={accumulation_steps} is not supported by objective "
                             f"{objective.config.objective!r} (its EMA teacher/centres update once per step); use "
                             f"accumulation.steps=1")
        extra_grad_fn = jax.value_and_grad(objective.loss_fn_with_extra, has_aux=True)
    else:
        grad_fn = step_grad_fn(objective, accumulation.make_grad_fn(objective, accumulation_steps, accumulation_mode))

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        batch = dict(batch)
        skipped = batch.pop(SKIPPED_KEY, None)  # bookkeeping of the input pipeline, not model input
        if objective.has_extra:
            (loss, (metrics, aux)), grads = extra_grad_fn(state.params, state.extra, batch, rng, state.step)
        else:
            (loss, metrics), grads = grad_fn(state.params, batch, rng, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        extra = state.extra
        if objective.has_extra:
            extra = keep_if_finite(objective.update_extra(state.extra, params, aux, state.step), state.extra)
        nonfinite = 1 - finite.astype(jnp.int32)
        skipped_records = jnp.zeros((), jnp.int32) if skipped is None else skipped.sum().astype(jnp.int32)
        counters = dict(state.counters, skipped_nonfinite_steps=state.counters["skipped_nonfinite_steps"] + nonfinite,
                        skipped_bad_records=state.counters["skipped_bad_records"] + skipped_records)
        new_state = TrainState(step=state.step + 1, params=keep_if_finite(params, state.params),
                               opt_state=keep_if_finite(opt_state, state.opt_state), extra=extra, counters=counters)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step), nonfinite=nonfinite,
                       skipped_records=skipped_records)
        return new_state, metrics

    return train_step


def step_grad_fn(objective: Objective, grad_fn: accumulation.GradFn) -> Callable:
    """`(params, batch, rng, step) -> ((loss, metrics), grads)`: `grad_fn` on the batch with the objective's
    per-step inputs (FLIP's kept patches). A final unmasked phase is a `lax.cond` on the step: one compiled step
    holds both branches, so the switch neither recompiles nor depends on where a run resumed."""

    def with_inputs(patch_dropout: bool) -> Callable:
        return lambda params, batch, rng: grad_fn(params, objective.add_step_inputs(batch, rng, patch_dropout), rng)

    until = objective.patch_dropout_until_step
    if until is None:
        return lambda params, batch, rng, step: with_inputs(True)(params, batch, rng)
    return lambda params, batch, rng, step: jax.lax.cond(step < until, with_inputs(True), with_inputs(False),
                                                         params, batch, rng)


# XLA:CPU options for the train step (benchmarks/train_step.py, the CPU MFU note in the README). Region analysis in
# copy insertion lets the non-finite guard's `where(finite, new, old)` write the donated params and optimizer state in
# place: without it XLA:CPU copies every optimizer-state leaf each step (319 copies of the bench model's 94 MB of
# Adam moments). Changes buffer assignment only, never numerics.
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def compiler_options() -> dict[str, Any] | None:
    """Per-jit XLA options for this process's default backend (None: XLA's defaults)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def jit_train_step(exp: Experiment) -> Callable:
    config = exp.config
    step = make_train_step(exp.objective, exp.optimizer, exp.schedule, config.seed, config.accumulation.steps,
                           config.accumulation.mode)
    # The batch arrives sharded on the batch axes (sharding.host_to_global); its fields vary by caller.
    return jax.jit(step, in_shardings=(exp.state_shardings, None), out_shardings=(exp.state_shardings, None),
                   donate_argnums=(0,), compiler_options=compiler_options())


def make_train_iterator(config: ml_collections.ConfigDict, objective: Objective):
    if config.data.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
    select = SelectCaption(config.data.train_caption, config.seed, config.data.synthetic_caption_prob)
    select = objective.train_example_transform(select)  # e.g. both captions, MIM masks
    tokenize = TokenizeBatch(objective.tokenizer, config.data.max_text_len)
    spec = pipeline.TrainStreamSpec(config.batch_size, config.seed, jax.process_index(), jax.process_count(),
                                    config.data.worker_count, config.data.read_threads,
                                    config.data.max_bad_record_share, config.data.bad_record_window)
    return iter(pipeline.make_train_dataset(train_streams(config), select, tokenize, spec))


def train_streams(config: ml_collections.ConfigDict) -> list[pipeline.SourceStream]:
    """The training sources (`data.mixture`, else `data.source`) with their weights and image geometry: a random
    resized crop (+ flip) to `data.image_size` for real images, none for shapes (its captions name positions)."""
    data = config.data
    streams = []
    for spec, weight in vlp_config.parse_mixture(data.mixture) or [(data.source, 1.0)]:
        source = sources.make_source(spec, data.train_split, data.image_size)
        crop = augment.RandomResizedCrop(data.image_size, tuple(data.random_crop_scale), data.random_flip) \
            if sources.augmentable(spec) else None
        streams.append(pipeline.SourceStream(source, weight, crop))
    return streams


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


def _initial_state(exp: Experiment, checkpointer: Checkpointer, data_iter: Any) -> tuple[int, TrainState]:
    """The workdir's newest good checkpoint (params, optimizer, step, data position); else `init_from`'s params or
    a fresh init. A workdir whose checkpoints are all damaged is an error unless the config allows a restart, which
    then begins at the start of the data stream like a new workdir."""
    config = exp.config
    if checkpointer.latest_step() is not None:
        try:
            step, state = checkpointer.restore(frozen.without_reference(exp.abstract_state), data_iter)
            say(f"resumed from checkpoint step {step}")
            return step, _with_reference(exp, state, resumed=True)
        except UnrestorableCheckpointError as e:  # damage only: a transient read error stops the run instead
            if config.on_unrestorable_checkpoint != "fresh_start":
                raise
            # Moved aside so the fresh run can write those steps again; the data iterator was never moved.
            checkpointer.quarantine(e.damaged_steps)
            say(f"no checkpoint in the workdir can be restored ({e}); starting afresh (on_unrestorable_checkpoint="
                "'fresh_start')")
    state = exp.init_state()
    source = config.init_from
    if source.path and source.format == "vlp":
        step, params = restore_params(source.path, exp.abstract_state.params)
        state = state.replace(params=params)
        say(f"initialised params from {source.path} (step {step}); optimizer state and step start afresh")
    elif source.path:
        state = state.replace(params=load_init_params(config, exp.objective, exp.abstract_state.params))
        say(f"initialised params from {source.path} ({source.format}); optimizer state and step start afresh")
    if exp.objective.has_extra:  # from the params actually used (an EMA teacher of init_from's), or from disk
        with exp.context():
            state = state.replace(extra=exp.objective.initial_extra(state.params, exp.state_shardings.extra))
    return 0, _with_reference(exp, state, resumed=False)


def _with_reference(exp: Experiment, state: TrainState, resumed: bool) -> TrainState:
    """`state` with the objective's frozen reference model (if it reads one) loaded into its extra state; checkpoints
    never hold it (`frozen.without_reference`), a resumed state's fingerprint must match it."""
    if exp.objective.reference is None:
        return state
    with exp.context():
        state = frozen.attach_reference(exp.objective.reference, state, exp.state_shardings.extra, resumed)
    say(f"loaded the frozen reference model from {exp.objective.reference.path} ({exp.objective.reference.format})")
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates, writes final_metrics.json.

    Raises `Preempted` after saving a checkpoint when a preemption notice (SIGTERM) arrives, `NonFiniteLossError`
    under nan_policy='stop', `CheckpointWriteError` under on_checkpoint_error='stop'.
    """
    workdir = prepare_workdir(workdir)
    exp = build_experiment(config)
    check_resume_config(workdir, config)  # before config.json is rewritten and before anything is compiled
    write_run_files(workdir, config)
    say(f"objective {config.objective} | mesh {dict(exp.mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | batch {config.batch_size} | "
        f"workdir {workdir}")

    data_iter = make_train_iterator(config, exp.objective)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                                async_save=config.async_checkpointing)
    writer = None
    try:
        start_step, state = _initial_state(exp, checkpointer, data_iter)
        with exp.context():
            evaluators = evaluation.build_evaluators(config, exp.objective, exp.mesh)
        train_step = jit_train_step(exp)
        writer = MetricWriter(workdir)
        loop = _Loop(exp, workdir, data_iter, train_step, checkpointer, evaluators, writer)
        loop_start = time.perf_counter()
        with exp.context(), PreemptionWatch() as preemption:
            with StepWatchdog.from_config(config.watchdog) as watchdog:
                state, metrics = loop.run(state, start_step, preemption, watchdog)
            train_seconds = time.perf_counter() - loop_start
            if checkpointer.latest_step() != config.total_steps:
                state = loop.save(config.total_steps, state, final=True)
            counters = {k: int(v) for k, v in jax.device_get(state.counters).items()}
            results = evaluation.run_evaluators(evaluators, exp.objective.eval_params(state.params, state.extra))
            writer.write(config.total_steps, results)
    finally:  # also on errors: finish pending async saves, stop grain workers, flush metrics
        checkpointer.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
        if writer is not None:
            writer.close()
    # The counters are whole-run totals: restored with the checkpoint, so earlier segments of a resumed run count.
    final = dict(sorted(results.items()), steps=config.total_steps, train_seconds=round(train_seconds, 2),
                 resumed_from_step=start_step, **counters)
    if metrics:
        final["final_loss"] = float(metrics["loss"])
    if jax.process_index() == 0:
        write_text_atomic(workdir / "final_metrics.json", json.dumps(final, indent=2))
        print(json.dumps(final), flush=True)
    return final


# A run that keeps diverging right after each rollback is not going to recover by itself.
MAX_CONSECUTIVE_ROLLBACKS = 3


def _new_interval(metrics: dict) -> dict:
    """The per-log-interval tally on the devices; `first_bad_metrics` is only read when `first_bad_step` >= 0."""
    return {"nonfinite": jnp.zeros((), jnp.int32), "first_bad_step": jnp.full((), -1, jnp.int32),
            "first_bad_metrics": metrics}


@jax.jit
def _tally_step(tally: dict, step: jax.Array, metrics: dict) -> dict:
    """One dispatch per step, no host sync: counts non-finite steps and keeps the step number and metrics of the
    interval's first non-finite step."""
    is_first = (tally["first_bad_step"] < 0) & (metrics["nonfinite"] > 0)
    keep = lambda new, old: jnp.where(is_first, new, old)  # noqa: E731
    return {"nonfinite": tally["nonfinite"] + metrics["nonfinite"],
            "first_bad_step": keep(step, tally["first_bad_step"]),
            "first_bad_metrics": jax.tree.map(keep, metrics, tally["first_bad_metrics"])}


class _Loop:
    """Steps start..total_steps with logging, periodic checkpoints and evals, the nan_policy, and preemption.

    The run's counters (skipped records and non-finite steps, rollbacks, failed saves) live in `TrainState.counters`
    and so are checkpointed with the step they belong to."""

    def __init__(self, exp: Experiment, workdir: epath.Path, data_iter: Any, train_step: Callable,
                 checkpointer: Checkpointer, evaluators: dict, writer: MetricWriter):
        self.exp, self.config, self.workdir = exp, exp.config, workdir
        self.data_iter, self.train_step, self.checkpointer = data_iter, train_step, checkpointer
        self.evaluators, self.writer = evaluators, writer
        self.flops_per_example = exp.objective.train_flops_per_example()
        self.peak = peak_flops_per_device(jax.devices()[0], self.config.hardware.peak_flops_per_device)

    def _set_counters(self, state: TrainState, **values: int) -> TrainState:
        """`state` with host-side counter values, placed like the jitted step expects them (replicated; the same
        value on every process)."""
        shardings = self.exp.state_shardings.counters
        counters = dict(state.counters)
        for name, value in values.items():
            counters[name] = jax.make_array_from_callback((), shardings[name], lambda _, v=value: np.int32(v))
        return state.replace(counters=counters)

    def save(self, step: int, state: TrainState, final: bool = False) -> TrainState:
        """Saves (and for the final or preemption checkpoint waits); an I/O failure follows on_checkpoint_error and
        is counted in the returned state (so the next checkpoint holds it)."""
        try:
            self.checkpointer.save(step, frozen.without_reference(state), self.data_iter, force=final)
            if final:
                self.checkpointer.wait()
        except CheckpointWriteError as e:
            latest = self.checkpointer.latest_step()
            kept = f"the newest complete checkpoint is step {latest}" if latest is not None else "no checkpoint yet"
            if final or self.config.on_checkpoint_error == "stop":
                raise CheckpointWriteError(f"{e}; {kept} (nothing already saved was touched)") from e
            say(f"WARNING: {e}; {kept}; training goes on and tries again at the next checkpoint "
                f"(on_checkpoint_error='continue')")
            failed = int(state.counters["failed_checkpoint_saves"]) + 1
            state = self._set_counters(state, failed_checkpoint_saves=failed)
        return state

    def run(self, state: TrainState, start_step: int, preemption: PreemptionWatch,
            watchdog: StepWatchdog) -> tuple[TrainState, dict]:
        config = self.config
        throughput = _Throughput(config.batch_size, config.total_steps)
        tally = None
        consecutive_rollbacks = 0
        metrics: dict[str, Any] = {}
        previous_done: jax.Array | None = None
        step = start_step
        while step < config.total_steps:
            data_start = time.perf_counter()
            host_batch = next(self.data_iter)
            batch = sharding.host_to_global(host_batch, self.exp.mesh)
            throughput.data_seconds += time.perf_counter() - data_start
            state, metrics = self.train_step(state, batch)
            if tally is None:
                tally = _new_interval(metrics)
            tally = _tally_step(tally, jnp.int32(step + 1), metrics)
            step += 1
            if step == start_step + 1:  # exclude compilation from the first interval's throughput
                jax.block_until_ready(state)
                throughput.reset(step)
                watchdog.finished(step)  # arms the watchdog: compilation is never timed
            elif previous_done is not None:
                # Wait for the previous step (this one is already queued, so the device stays busy): the watchdog
                # sees real step times, and a step stuck in a collective stops the loop here.
                jax.block_until_ready(previous_done)
                watchdog.finished(step - 1)
            previous_done = metrics["nonfinite"]
            if step % config.log_every == 0 or step == config.total_steps:
                bad = int(tally["nonfinite"])
                watchdog.finished(step)
                if bad:
                    bad_step, bad_metrics = int(tally["first_bad_step"]), to_python(tally["first_bad_metrics"])
                    if config.nan_policy == "stop":
                        self._dump_nonfinite(bad_step, bad_metrics, host_batch)
                        raise NonFiniteLossError(nonfinite_message(bad, step, bad_step, bad_metrics))
                    if config.nan_policy == "rollback":
                        consecutive_rollbacks += 1
                        with watchdog.paused(lambda: step):
                            state, step = self._rollback(state, step, bad, bad_step, bad_metrics,
                                                         consecutive_rollbacks)
                        tally = _new_interval(metrics)
                        previous_done = None
                        throughput.reset(step)
                        continue
                else:
                    consecutive_rollbacks = 0
                tally = _new_interval(metrics)
                self._log(step, metrics, state, throughput)
            if preemption.reached(step):
                with watchdog.paused(lambda: step):
                    self.save(step, state, final=True)
                say(f"preemption notice: saved the checkpoint of step {step}; exiting with code "
                    f"{PREEMPTED_EXIT_CODE} (run the same command again to resume)")
                raise Preempted(step)
            if step % config.checkpoint_every == 0 and step != config.total_steps:
                with watchdog.paused(lambda: step):
                    state = self.save(step, state)
                throughput.reset(step)
            if step % config.eval_every == 0 and step != config.total_steps:
                with watchdog.paused(lambda: step):
                    results = evaluation.run_evaluators(
                        self.evaluators, self.exp.objective.eval_params(state.params, state.extra))
                self.writer.write(step, results)
                say("eval " + " ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
                throughput.reset(step)
        return state, metrics

    def _log(self, step: int, metrics: dict, state: TrainState, throughput: _Throughput) -> None:
        logged = to_python(metrics)
        logged.pop("nonfinite", None)
        logged.pop("skipped_records", None)
        counters = to_python(state.counters)
        logged.update((name, counters[name]) for name in ("skipped_nonfinite_steps", "skipped_bad_records",
                                                          "rollbacks"))
        if step > throughput.start_step:
            logged.update(throughput.summary(step))
            if self.peak:
                logged["mfu"] = self.flops_per_example * logged["samples_per_second"] / (
                    self.peak * jax.device_count())
        self.writer.write(step, logged)
        say(progress_line(step, self.config.total_steps, logged))
        throughput.reset(step)

    def _rollback(self, state: TrainState, step: int, bad: int, bad_step: int, bad_metrics: dict,
                  consecutive: int) -> tuple[TrainState, int]:
        """Back to the newest checkpoint's TrainState; the data iterator stays where it is, so the batches that
        led to the non-finite step are skipped rather than replayed. The counters go on from `state`'s (records
        skipped in the abandoned window were still consumed), less the `bad` non-finite steps that the rollback
        undoes, plus one rollback."""
        latest = self.checkpointer.latest_step()
        if latest is None or consecutive > MAX_CONSECUTIVE_ROLLBACKS:
            why = ("there is no checkpoint to roll back to" if latest is None else
                   f"{MAX_CONSECUTIVE_ROLLBACKS} rollbacks in a row did not help")
            raise NonFiniteLossError(nonfinite_message(1, step, bad_step, bad_metrics) + f"; {why}")
        counters = {k: int(v) for k, v in jax.device_get(state.counters).items()}
        self.checkpointer.wait()
        restored_step, state = self.checkpointer.restore(frozen.without_reference(self.exp.abstract_state), None,
                                                         latest)
        state = _with_reference(self.exp, state, resumed=True)
        counters.update(rollbacks=counters["rollbacks"] + 1,
                        skipped_nonfinite_steps=counters["skipped_nonfinite_steps"] - bad)
        state = self._set_counters(state, **counters)
        rollbacks = counters["rollbacks"]
        say(f"WARNING: non-finite loss at step {bad_step}: rolled back to the checkpoint of step {restored_step} "
            f"and skipped the data of steps {restored_step + 1}..{step} (nan_policy='rollback', rollback "
            f"{rollbacks})")
        self.writer.write(step, {"rollback_to_step": float(restored_step), "rollbacks": float(rollbacks)})
        return state, restored_step

    def _dump_nonfinite(self, bad_step: int, bad_metrics: dict, host_batch: dict) -> None:
        """What a post-mortem needs: the step, its metrics and the last batch's keys, shapes and value ranges."""
        if jax.process_index() != 0:
            return
        summary = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype),
                       "nonfinite": int(np.size(v) - np.isfinite(np.asarray(v, np.float64)).sum()),
                       "min": float(np.min(v)), "max": float(np.max(v))} for k, v in host_batch.items()}
        dump = {"first_nonfinite_step": bad_step, "metrics": bad_metrics, "last_batch": summary}
        path = self.workdir / f"nonfinite_step_{bad_step}.json"
        write_text_atomic(path, json.dumps(dump, indent=2, default=str))
        say(f"wrote {path}")


def nonfinite_message(count: int, step: int, bad_step: int, bad_metrics: dict) -> str:
    terms = [k for k, v in bad_metrics.items() if k.startswith("loss") and not math.isfinite(v)]
    return (f"non-finite loss or gradient at step {bad_step} ({count} step(s) up to step {step} were not applied; "
            f"non-finite terms at step {bad_step}: {terms or ['gradient']}); nan_policy='skip' goes on, "
            f"'rollback' restores the last checkpoint")
