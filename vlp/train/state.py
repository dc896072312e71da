"""TrainState: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

# Run totals kept in the TrainState, so each checkpoint saves them atomically with the step they belong to and a
# resumed run reports the whole run's totals (not the last segment's). int32 scalars, replicated.
COUNTERS = ("skipped_nonfinite_steps", "skipped_bad_records", "rollbacks", "failed_checkpoint_saves")


def zero_counters() -> dict[str, jax.Array]:
    return {name: jnp.zeros((), jnp.int32) for name in COUNTERS}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    # State the optimizer does not train, updated inside the jitted step by the objective (an EMA teacher, DINO
    # centres); None for objectives without any (their checkpoints hold no extra entries).
    extra: Any = None
    # {name in COUNTERS: int32 scalar}: the train step adds skipped records and non-finite steps; the loop sets
    # rollbacks and failed checkpoint saves.
    counters: Any = None
