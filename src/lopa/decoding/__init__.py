"""Decoding strategies by name. A strategy is built from (DecodeConfig, ModelSpec)."""

from __future__ import annotations

from typing import Callable

from ..config import DecodeConfig
from .base import ModelSpec, Strategy
from .block_diffusion import FastDLLMv2Strategy, SDARStrategy
from .d2f import D2FStrategy
from .dream import DreamStrategy
from .lopa import lopa_strategy
from .published import PublishedStrategy
from .threshold import ThresholdStrategy

STRATEGIES: dict[str, Callable[[DecodeConfig, ModelSpec], Strategy]] = {
    "threshold": ThresholdStrategy,
    "d2f": D2FStrategy,
    "lopa": lopa_strategy,
    "dream": DreamStrategy,
    "sdar": SDARStrategy,
    "fast_dllm_v2": FastDLLMv2Strategy,
}


def make_strategy(cfg: DecodeConfig, spec: ModelSpec) -> Strategy:
    if cfg.compat == "published":
        return PublishedStrategy(cfg, spec)
    return STRATEGIES[cfg.strategy](cfg, spec)
