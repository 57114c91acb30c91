"""Decoding strategies by name. A strategy is built from (DecodeConfig, ModelSpec)."""

from __future__ import annotations

from typing import Callable

from ..config import DecodeConfig
from ..errors import ConfigError
from .base import ModelSpec, Strategy
from .d2f import D2FStrategy
from .dream import DreamStrategy
from .lopa import lopa_strategy
from .threshold import ThresholdStrategy

STRATEGIES: dict[str, Callable[[DecodeConfig, ModelSpec], Strategy]] = {
    "threshold": ThresholdStrategy,
    "d2f": D2FStrategy,
    "lopa": lopa_strategy,
    "dream": DreamStrategy,
}
COMPAT: dict[str, Callable[[DecodeConfig, ModelSpec], Strategy]] = {}  # compat name -> factory (published.py)


def register_compat(name: str):
    def deco(factory):
        COMPAT[name] = factory
        return factory
    return deco


def make_strategy(cfg: DecodeConfig, spec: ModelSpec) -> Strategy:
    if cfg.compat != "default":
        if cfg.compat not in COMPAT:
            raise ConfigError(f"compat: mode {cfg.compat!r} is not available")
        return COMPAT[cfg.compat](cfg, spec)
    return STRATEGIES[cfg.strategy](cfg, spec)
