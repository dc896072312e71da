"""Argument handling shared by the tools: a workdir, its config, optional overrides."""

from __future__ import annotations

import argparse

import ml_collections

from vlp import config as vlp_config
from vlp.train.workdir import load_config


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


def resolve_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    overrides = vlp_config.parse_overrides(args.set)
    if args.config:
        config = vlp_config.load_config_file(args.config)
        vlp_config.apply_overrides(config, overrides)
        return config
    return load_config(args.workdir, overrides)
