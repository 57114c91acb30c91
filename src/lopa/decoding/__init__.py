"""Decoding strategies by name. A strategy is built from (DecodeConfig, ModelSpec).

The names are config.STRATEGIES (what DecodeConfig accepts); this module maps each to its builder."""

from __future__ import annotations

from typing import Callable

from ..config import STRATEGIES, DecodeConfig
from .base import ModelSpec, Strategy
from .block_diffusion import FastDLLMv2Strategy, SDARStrategy
from .d2f import D2FStrategy
from .dream import DreamStrategy
from .lopa import lopa_strategy
from .published import PublishedStrategy
from .threshold import ThresholdStrategy

BUILDERS: dict[str, Callable[[DecodeConfig, ModelSpec], Strategy]] = {
    "threshold": ThresholdStrategy,
    "d2f": D2FStrategy,
    "lopa": lopa_strategy,
    "dream": DreamStrategy,
    "sdar": SDARStrategy,
    "fast_dllm_v2": FastDLLMv2Strategy,
}
if set(BUILDERS) != set(STRATEGIES):  # a strategy named in one place only: fail at import, not on a request
    raise ImportError(f"decoding.BUILDERS {sorted(BUILDERS)} != config.STRATEGIES {sorted(STRATEGIES)}")


def make_strategy(cfg: DecodeConfig, spec: ModelSpec) -> Strategy:
    if cfg.compat == "published":
        return PublishedStrategy(cfg, spec)
    return BUILDERS[cfg.strategy](cfg, spec)
