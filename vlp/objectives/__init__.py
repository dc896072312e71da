"""Training objectives, registered by name. A new method is one file here plus one config file.

An objective builds its model from the config and defines `loss_fn(params, batch, rng) -> (loss, metrics)`
by composing `vlp.models` and `vlp.losses`; the trainer finds it from `config.objective`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: makes an Objective subclass available as `config.objective = name`."""

    def wrap(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def get_objective(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid: {available_objectives()}")
    return _REGISTRY[name]


def config_blocks() -> dict[str, dict]:
    """Each registered objective's own config block (`Objective.default_config`), by its registered name."""
    return {name: block for name, cls in sorted(_REGISTRY.items()) if (block := cls.default_config()) is not None}


# Built-in objectives register themselves on import.
from vlp.objectives import (  # noqa: E402,F401
    albef, alip, align, cappa, cleanclip, clim, clip, coca, distill, eva, fdt, mae, mlcd, modx, mofi, prompt, siglip,
    simmim, symile, tcl, tips, uniter, xbt)
