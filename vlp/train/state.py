"""TrainState: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    # State the optimizer does not train, updated inside the jitted step by the objective (an EMA teacher, DINO
    # centres); None for objectives without any (their checkpoints hold no extra entries).
    extra: Any = None
