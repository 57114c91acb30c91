"""One request inside the engine (``Sequence``), what it cost (``Stats``), and what the engine reports.

Counting (what every report says it counted): a forward marked ``prefill`` is a prefill forward and is
reported apart; every other forward is one decode forward for each request in it, however many branch rows
the request had (a batched verification counts once). Generated tokens are the strategy's output up to and
including the first EOS (decoding/base.py: counted_tokens). TPF = generated / decode forwards; tokens/s =
generated / decode seconds, where a request's decode seconds are the wall times of the engine steps it took
part in (prefill seconds apart).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..config import DecodeConfig
from ..decoding.base import DecodeState, ForwardBatch, PredictSpec, Step, Strategy


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

    def add_forward(self, batch: ForwardBatch, seconds: float) -> None:
        if batch.prefill:
            self.prefill_forwards += 1
            self.prefill_tokens += batch.commit
            self.prefill_s += seconds
        else:
            self.add_decode(batch.tokens.shape[0], seconds)

    def add_decode(self, rows: int, seconds: float) -> None:
        self.decode_forwards += 1
        self.branch_rows += rows
        self.decode_s += seconds

    def as_dict(self) -> dict:
        keys = ("generated_tokens", "decode_forwards", "prefill_forwards", "prefill_tokens", "branch_rows",
                "prefill_s", "decode_s", "hit_round_cap", "tpf", "wall_s", "tokens_per_s", "mean_branches")
        return {k: getattr(self, k) for k in keys}


@dataclass
class RunOutput:
    token_ids: list[int]
    stats: Stats
    trace: list[Step] = field(default_factory=list)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its strategy (one per request: it holds the request's seeded rng) and decoding state, the
    forward it needs next, and its place in the KV pool. No device tensors except the sampling generator."""

    id: str
    prompt: list[int]
    config: DecodeConfig
    strategy: Strategy
    state: DecodeState
    pspec: PredictSpec
    need: int  # KV positions its slot must hold: the most any of its forwards can write (engine.py: kv_need)
    batch: ForwardBatch | None = None  # the next forward, proposed right after the last accept; None = done
    status: Status = Status.WAITING
    slot: int | None = None  # its index in scheduler.running (dense slots)
    stats: Stats = field(default_factory=Stats)
    stream: bool = False  # emit settled blocks while running (RequestOutput.new_ids), not only at the end
    emitted: int = 0  # generated ids already reported
    finish_reason: str | None = None  # stop | length | abort | error
    generator: Any = None  # torch.Generator on the runner's device, when the request samples
    error: BaseException | None = None  # what ended it, when its strategy (or the step) failed
    device_ok: bool = False  # its decode iterations may run on the device path (engine/device.py)
    on_device: bool = False  # its state lives in the device path's slot rows now; state and batch are stale
    device_shape: tuple[int, int] = (0, 0)  # on the device path: (K, W) of its next forward, read back each step

    @property
    def prefill_pending(self) -> bool:
        return self.batch is not None and self.batch.prefill


@dataclass
class RequestOutput:
    """What Engine.step reports for a request that has news."""

    request_id: str
    new_ids: list[int]  # generated ids settled since its previous output (whole blocks until the end)
    finished: bool
    finish_reason: str | None  # None while running; "stop" (EOS), "length" (gen_length or round cap), "abort", "error"
    result: RunOutput | None = None  # at finish (not when aborted or failed): token ids, stats, trace
    error: BaseException | None = None  # finish_reason "error": what failed
