"""`lopa`: Lookahead PArallel decoding (Algorithm 1) over the d2f pipeline, the threshold window, or a
block-diffusion model's own loop (sdar, fast_dllm_v2: decoding/block_diffusion.py).

Each iteration the anchor branch holds the base strategy's fill set; k lookahead branches each also fill
one more of the most confident remaining positions; all k+1 are verified in ONE forward, scored by
branch confidence (Eq. 2, DecodeConfig.branch_confidence), and the best branch becomes the canvas while
its predictions drive the next fill. The loop itself lives in window.py, shared with the base strategies,
so that k = 0 is exactly the base strategy.
"""

from __future__ import annotations

from ..config import DecodeConfig
from .base import ModelSpec
from .block_diffusion import FastDLLMv2Strategy, SDARStrategy
from .d2f import D2FStrategy
from .threshold import ThresholdStrategy
from .window import WindowStrategy

BASES: dict[str, type[WindowStrategy]] = {"d2f": D2FStrategy, "threshold": ThresholdStrategy, "sdar": SDARStrategy,
                                          "fast_dllm_v2": FastDLLMv2Strategy}


def lopa_strategy(cfg: DecodeConfig, spec: ModelSpec) -> WindowStrategy:
    """LoPA with cfg.k lookahead branches over the pipeline named by cfg.base."""
    strategy = BASES[cfg.base](cfg, spec, lookahead=cfg.k)
    strategy.name = "lopa"
    return strategy
