"""Argument handling shared by the tools: a workdir, its config, optional overrides."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import ml_collections


def quiet_library_logs() -> None:
    """Library INFO logs (orbax, XLA) go to absl at INFO; tools print their own results."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="run directory written by `python -m vlp.train`")
    parser.add_argument("--config", default=None,
                        help="config file[:arg] to use instead of <workdir>/config.json (e.g. configs/clip.py:tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set evals.zeroshot.num_examples=500 (repeatable)")


def resolve_config(args: argparse.Namespace,
                   prepare: Callable[[ml_collections.ConfigDict], None] | None = None) -> ml_collections.ConfigDict:
    """--config (or the workdir's config.json), then `prepare(config)` (e.g. adding evaluators), then --set."""
    # Imported here, not at the top: they import jax and flax, which `--help` does not need.
    from vlp import config as vlp_config
    from vlp.train.workdir import load_config

    overrides = vlp_config.parse_overrides(args.set)
    config = vlp_config.load_config_file(args.config) if args.config else load_config(args.workdir)
    if prepare is not None:
        prepare(config)
    vlp_config.apply_overrides(config, overrides)
    return config
