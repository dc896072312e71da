"""A run's own resolved config (`<workdir>/config.json`): resume or extend a run exactly as it was configured, e.g. an
EVA run whose teacher workdir is gone (its config.json records the teacher's config, its checkpoints the params).

Usage: `python -m vlp.train --config=configs/workdir.py:runs/eva --workdir=runs/eva [--config.total_steps=2000]`
(the argument is the workdir; `,key=value` overrides may follow it, as for the method configs).
"""

from pathlib import Path

from vlp import config as vlp_config


def get_config(arg: str | None = None):
    workdir, _, rest = (arg or "").partition(",")
    if not workdir:
        raise ValueError("configs/workdir.py needs the run's workdir as its argument, e.g. "
                         "--config=configs/workdir.py:runs/eva")
    config = vlp_config.load_json(Path(workdir) / "config.json")
    _, overrides = vlp_config.parse_arg(rest, ("",))
    vlp_config.apply_overrides(config, overrides)
    return config
