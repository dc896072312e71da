"""`python -m vlp.train --config=configs/clip.py:tiny --workdir=runs/x [--config.total_steps=300]`.

Running the same command again resumes from the workdir's latest checkpoint. The same command runs on every host of a
multi-host job (TPU pod slice, SLURM, GKE, launch/cpu_multiprocess.sh): `vlp.parallel.distributed` reads the layout
from the environment.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. configs/clip.py:tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json, final_metrics.json.")
flags.mark_flags_as_required(["config", "workdir"])

NONFINITE_EXIT_CODE = 65  # EX_DATAERR: the run diverged (nan_policy='stop')
CHECKPOINT_WRITE_EXIT_CODE = 74  # EX_IOERR: a checkpoint could not be written (on_checkpoint_error='stop')
# Also: 75 (vlp.train.preemption.PREEMPTED_EXIT_CODE) preempted, checkpoint saved, requeue; 76
# (vlp.train.watchdog.HUNG_EXIT_CODE) a step hung (the step watchdog ended the process with os._exit), requeue.


def moved_flag_error(argv: list[str]) -> str | None:
    """The message for a `--config.<key>=` flag whose key moved (vlp.config.MOVED_KEYS), else None: ml_collections
    would reject it at flag parsing with a bare unknown-key error."""
    from vlp.config import moved_key_error

    for arg in argv[1:]:
        if arg.startswith("--config."):
            error = moved_key_error(arg[len("--config."):].split("=", 1)[0], "the command line")
            if error is not None:
                return f"vlp: {error.args[0]}"
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax, XLA) drown the progress lines
        logging.set_verbosity(logging.WARNING)
    from vlp.parallel import distributed

    distributed.initialize()  # before anything touches a device
    from vlp.train.checkpoint import CheckpointWriteError
    from vlp.train.preemption import PREEMPTED_EXIT_CODE, Preempted
    from vlp.train.trainer import NonFiniteLossError, train_and_evaluate

    # Distinct exit codes, so schedulers and wrappers can tell what happened (README, "What vlp guarantees").
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as e:
        print(f"vlp: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except NonFiniteLossError as e:
        print(f"vlp: stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(NONFINITE_EXIT_CODE)
    except CheckpointWriteError as e:
        print(f"vlp: stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(CHECKPOINT_WRITE_EXIT_CODE)


if __name__ == "__main__":
    from vlp.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # XLA:CPU: no page faults on every step's buffers
    if moved := moved_flag_error(sys.argv):
        sys.exit(moved)
    app.run(main)
