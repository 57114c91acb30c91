"""The contract between decoding strategies and the runner.

A strategy never touches the model or a device. Each iteration the engine asks it for a batch, runs ONE
forward for all its branches (together with every other running request's), turns logits into small CPU
``Predictions`` and hands them back:

    batch = strategy.propose(state)        # tokens [K, W] over the committed prefix, or None when done
    preds = runner.execute([...batch...])  # Predictions [K, C] for the requested window columns
    row   = strategy.accept(state, batch, preds)   # fill, pick the winner, update the state
    runner.commit([...row, batch.commit...])       # the winner's leading K/V become part of its KV slot

Rules that batching and Branch Parallel rely on: one strategy instance per request (it holds the request's
seeded rng); propose is called once per forward and its batch may wait until it runs (it copies its rows);
no wall-clock, no process-global RNG, nothing that depends on the device or rank.

Shape letters, used in comments across the package:
    K  branches in one forward (k lookaheads + 1 anchor)     W  window columns (positions after the cache)
    C  window columns whose predictions are requested        P  committed (cached) prefix length
    T  canvas length (prompt + generated region)             V  vocabulary size
    L  layers   H / Hkv  query / key-value heads   D  head dim   E  hidden size
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import PromptTooLongError
from ..models.spec import ModelSpec  # re-exported: strategies are built from (DecodeConfig, ModelSpec)

if TYPE_CHECKING:  # config validates against decoding.confidence, so import it for typing only
    from ..config import DecodeConfig


@dataclass(frozen=True)
class PredictSpec:
    """How the runner turns logits into Predictions (see decoding/confidence.py: predict)."""

    temperature: float = 0.0
    top_p: float = 1.0
    measure: str = "prob"  # prob | neg_entropy | margin: what goes into Predictions.conf
    suppress_ids: tuple[int, ...] = ()  # token ids never proposed (the mask id, in lopa's default mode)

    @property
    def greedy(self) -> bool:
        """The argmax of the logits, with no draw: what the batched greedy predict (runner/graphs.py) computes."""
        return self.temperature == 0 and self.top_p == 1.0


@dataclass
class ForwardBatch:
    """One forward over the committed prefix: K branches of a W-column window starting at ``start``."""

    tokens: torch.Tensor  # [K, W] int64 window tokens per branch (cols past `lengths[r]` are padding)
    start: int  # absolute position of column 0; equals the committed cache length P
    logit_cols: torch.Tensor  # [C] int64 window columns whose predictions are needed (same for every row)
    commit: int = 0  # leading columns whose K/V the winning row commits to the cache after accept
    block_ids: torch.Tensor | None = None  # [W] int64; None = bidirectional window; else col i sees col j iff block_ids[j] <= block_ids[i]
    lengths: tuple[int, ...] | None = None  # valid columns per row (rows may differ); None = all W
    prefill: bool = False  # a prompt prefill: counted apart from decode forwards

    def __post_init__(self) -> None:
        K, W = self.tokens.shape
        assert self.tokens.dtype == torch.int64, self.tokens.dtype
        assert self.start >= 0 and 0 <= self.commit <= W, (self.start, self.commit, W)
        assert self.block_ids is None or self.block_ids.shape == (W,), self.block_ids
        # rows of one batch fill its W columns; a subset of them (a Branch Parallel rank's rows) may fill fewer
        assert self.lengths is None or (len(self.lengths) == K and max(self.lengths, default=0) <= W), self.lengths


@dataclass
class Predictions:
    """Per (branch, requested column): the proposed token and its confidences. CPU tensors."""

    tokens: torch.Tensor  # [K, C] int64 argmax (temperature 0) or sampled token
    prob: torch.Tensor  # [K, C] float32 probability of `tokens` (the τ test uses this)
    conf: torch.Tensor  # [K, C] float32 confidence under PredictSpec.measure (ranking and branch scores)


@dataclass
class Step:
    """Trace record of one decode iteration (kept when DecodeConfig.trace is set)."""

    filled: list[int]  # absolute positions the winner filled this iteration, in fill order
    winner: int  # winning row (0 = anchor)
    scores: list[float]  # branch confidence per row ([] when there was only one branch)
    fills: list[int] = field(default_factory=list)  # per row: positions it would have filled had it won ([] if one row)


@dataclass
class DecodeState:
    """Mutable state of one request. Strategies subclass it for their own bookkeeping."""

    canvas: torch.Tensor  # [T] int64 CPU; mask id where unfilled; the current winner's tokens
    prompt_len: int
    cached: int = 0  # committed prefix length P (mirrors the runner's cache)
    rounds: int = 0  # decode forwards so far
    done: bool = False
    hit_round_cap: bool = False  # stopped by max_rounds rather than by finishing
    row_budget: int | None = None  # query rows (K * W) the runner allows the next forward; None = no limit. Set
    # by whoever drives the strategy before propose (the engine, from the step's load); k_policy "load" reads it
    trace: list[Step] = field(default_factory=list)


class Strategy(ABC):
    """One decoding method. Subclasses register a ``name`` in decoding/__init__.py's registry."""

    name: ClassVar[str]

    def __init__(self, cfg: DecodeConfig, spec: ModelSpec) -> None:
        self.cfg = cfg
        self.spec = spec

    @property
    def predict_spec(self) -> PredictSpec:
        """Default: the configured sampling and measure, with the mask token never proposed."""
        return PredictSpec(self.cfg.temperature, self.cfg.top_p, self.cfg.confidence, (self.spec.mask_id,))

    def largest_forward(self, prompt_len: int) -> int:
        """The most query positions (K*W) one decode forward of a request can hold; the engine refuses a request
        whose largest forward exceeds RunnerConfig.max_num_batched_tokens. Default: one row over the whole
        sequence (a strategy without a KV cache)."""
        return prompt_len + self.cfg.gen_length

    @abstractmethod
    def start(self, prompt: list[int]) -> DecodeState:
        """A fresh state for ``prompt`` (token ids). Raises PromptTooLongError when it cannot fit."""

    @abstractmethod
    def propose(self, state: DecodeState) -> ForwardBatch | None:
        """The next forward to run, or None when decoding has finished (state.done is then True)."""

    @abstractmethod
    def accept(self, state: DecodeState, batch: ForwardBatch, preds: Predictions) -> int:
        """Consume the forward's predictions; return the winning row whose K/V get committed."""

    @abstractmethod
    def output(self, state: DecodeState) -> list[int]:
        """Generated token ids: from the prompt's end up to and including the first EOS (all, if none)."""


def new_canvas(prompt: list[int], gen_length: int, spec: ModelSpec) -> torch.Tensor:
    """[T] prompt followed by gen_length mask ids; PromptTooLongError when it exceeds the context."""
    P, T = len(prompt), len(prompt) + gen_length
    if T > spec.max_length:
        raise PromptTooLongError(f"prompt ({P} tokens) + gen_length ({gen_length}) = {T} exceeds the context ({spec.max_length})")
    canvas = torch.full((T,), spec.mask_id, dtype=torch.int64)
    canvas[:P] = torch.tensor(prompt, dtype=torch.int64)
    return canvas


def first_eos(canvas: torch.Tensor, prompt_len: int, spec: ModelSpec) -> int | None:
    hits = torch.isin(canvas[prompt_len:], torch.tensor(spec.eos_ids)).nonzero()
    return prompt_len + int(hits[0]) if len(hits) else None


def settle_eos(canvas: torch.Tensor, prompt_len: int, spec: ModelSpec) -> int | None:
    """EOS ends the answer: masked positions after the first EOS become EOS (never counted). Returns its position."""
    eos = first_eos(canvas, prompt_len, spec)
    if eos is not None:
        tail = canvas[eos + 1:]
        tail[tail == spec.mask_id] = spec.eos_ids[0]
    return eos


def answer_ids(canvas: torch.Tensor, prompt_len: int, spec: ModelSpec) -> list[int]:
    """Generated ids up to and including the first EOS; if decoding stopped early, the filled prefix only."""
    eos = first_eos(canvas, prompt_len, spec)
    ids = canvas[prompt_len: eos + 1 if eos is not None else len(canvas)]
    holes = (ids == spec.mask_id).nonzero()
    return ids[: int(holes[0])].tolist() if len(holes) else ids.tolist()


def counted_tokens(ids: list[int], spec: ModelSpec) -> int:
    """What TPF and tokens/s count: ids up to and including the first EOS, never a still-masked position."""
    for i, t in enumerate(ids):
        if t == spec.mask_id:
            return i
        if t in spec.eos_ids:
            return i + 1
    return len(ids)
