"""The single-device runner: owns the model, its KV cache and the device; drives one strategy.

    state = strategy.start(prompt)
    while (batch := strategy.propose(state)) is not None:
        preds = runner.forward(batch, strategy.predict_spec)   # ONE forward for all K rows
        row = strategy.accept(state, batch, preds)
        runner.commit(row, batch.commit)

Counting (what every report says it counted): a batch marked ``prefill`` is a prefill forward and is
reported apart; every other batch is one decode forward however many branch rows it holds. Generated
tokens are the strategy's output up to and including the first EOS (decoding/base.py: counted_tokens). TPF = generated / decode forwards;
tokens/s = generated / decode seconds (prefill seconds are reported apart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import KVCache
from ..decoding.base import DecodeState, ForwardBatch, ModelSpec, PredictSpec, Predictions, Step, Strategy, counted_tokens
from ..decoding.confidence import predict
from ..models.attention import branch_mask


@dataclass
class Stats:
    """What one generation cost. All counts are exact; times are wall-clock seconds on the host."""

    generated_tokens: int = 0  # up to and including the first EOS; never prompt or padding
    decode_forwards: int = 0  # one per decode iteration, however many branches it verified
    prefill_forwards: int = 0
    prefill_tokens: int = 0  # prompt positions processed by prefill forwards
    branch_rows: int = 0  # sum over decode forwards of the rows (branches) in each
    prefill_s: float = 0.0
    decode_s: float = 0.0
    hit_round_cap: bool = False  # stopped by DecodeConfig.max_rounds instead of finishing

    @property
    def tpf(self) -> float:
        """Tokens per (decode) forward pass."""
        return self.generated_tokens / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (prefill time excluded; see prefill_s)."""
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_branches(self) -> float:
        return self.branch_rows / self.decode_forwards if self.decode_forwards else 0.0

    def as_dict(self) -> dict:
        keys = ("generated_tokens", "decode_forwards", "prefill_forwards", "prefill_tokens", "branch_rows",
                "prefill_s", "decode_s", "hit_round_cap", "tpf", "wall_s", "tokens_per_s", "mean_branches")
        return {k: getattr(self, k) for k in keys}


@dataclass
class RunOutput:
    token_ids: list[int]
    stats: Stats
    trace: list[Step] = field(default_factory=list)


class Runner:
    """Runs forwards for strategies on one device: window over the committed prefix, K branches batched."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.cache: KVCache | None = None
        self._hidden: torch.Tensor | None = None  # [K, W, E] of the last forward, for commit's last_hidden
        self._width = 0
        self.generator: torch.Generator | None = None

    # -- one request ------------------------------------------------------------------------------
    def _new_cache(self, capacity: int) -> KVCache:
        cfg = self.model.config
        return KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, self.device, self.dtype)

    def capacity_for(self, canvas_len: int, branches: int) -> int:
        """Initial cache size for a request; the eager path grows it when a forward needs more."""
        return canvas_len + 64

    def _ensure_capacity(self, needed: int) -> None:
        """Grow (re-allocate) the cache so that prefix + scratch fits; keeps the committed prefix."""
        assert self.cache is not None
        if needed <= self.cache.capacity:
            return
        grown = self._new_cache(max(needed, 2 * self.cache.capacity))
        grown.copy_prefix_from(self.cache)
        self.cache = grown

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pspec: PredictSpec) -> Predictions:
        """One forward of batch.tokens [K, W] over the committed prefix; predictions for batch.logit_cols."""
        assert self.cache is not None, "call run() (or start a request) first"
        K, W = batch.tokens.shape
        P = self.cache.length
        if batch.start != P:
            raise RuntimeError(f"strategy window starts at {batch.start} but the cache holds {P} positions")
        self._ensure_capacity(P + K * W)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        block_ids = None if batch.block_ids is None else batch.block_ids.to(self.device)
        mask = branch_mask(P, K, W, block_ids, batch.lengths, device=self.device)  # [K*W, P+K*W]
        hidden = self.model(tokens, start=P, cache=self.cache, attn_mask=mask)  # [K, W, E]
        self._hidden, self._width = hidden, W
        cols = batch.logit_cols.to(self.device)
        if cols.numel() == 0:
            empty = torch.empty(K, 0)
            return Predictions(empty.long(), empty, empty)
        logits = self.model.logits(hidden, cols, self.cache)  # [K, C, V] float32
        return predict(logits, pspec, self.generator)

    def commit(self, row: int, n: int) -> None:
        """Make the winning row's first n window columns part of the committed prefix."""
        if n <= 0:
            return
        assert self.cache is not None and self._hidden is not None
        self.cache.commit(row, n, self._width, self._hidden[row, n - 1])

    @torch.inference_mode()
    def run(
        self,
        strategy: Strategy,
        prompt: list[int],
        seed: int = 0,
        on_step: Callable[[DecodeState], None] | None = None,
    ) -> RunOutput:
        """Decode one prompt with one strategy. ``on_step`` is called after every forward (progress bars)."""
        state = strategy.start(prompt)
        self.cache = self._new_cache(self.capacity_for(len(state.canvas), getattr(strategy, "lookahead", 0) + 1))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        stats = Stats()
        pspec = strategy.predict_spec
        while True:
            t0 = time.perf_counter()
            batch = strategy.propose(state)
            if batch is None:
                stats.decode_s += time.perf_counter() - t0
                break
            preds = self.forward(batch, pspec)
            row = strategy.accept(state, batch, preds)
            self.commit(row, batch.commit)
            elapsed = time.perf_counter() - t0
            if batch.prefill:
                stats.prefill_forwards += 1
                stats.prefill_tokens += batch.commit
                stats.prefill_s += elapsed
            else:
                stats.decode_forwards += 1
                stats.branch_rows += batch.tokens.shape[0]
                stats.decode_s += elapsed
            if on_step is not None:
                on_step(state)
        ids = strategy.output(state)
        stats.generated_tokens = counted_tokens(ids, self.spec)
        stats.hit_round_cap = state.hit_round_cap
        self._hidden = None
        return RunOutput(ids, stats, state.trace)
