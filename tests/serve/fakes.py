"""A stand-in engine with the real Engine's thread contract (prepare anywhere; add/abort/step on one thread).

Pure Python and deterministic: request r "generates" its prompt ids cycled, block_size ids per step, up
to gen_length, then finishes with "length". ``gate`` (a threading.Event) pauses step() while cleared;
``fail_next`` makes the next step raise. For the engine-loop and HTTP-error tests that need no model.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

from lopa.errors import ConfigError


@dataclass
class FakeStats:
    generated_tokens: int = 0
    decode_forwards: int = 0
    prefill_forwards: int = 1
    branch_rows: int = 0
    hit_round_cap: bool = False

    @property
    def tpf(self) -> float:
        return self.generated_tokens / self.decode_forwards if self.decode_forwards else 0.0


@dataclass
class FakeSeq:
    id: str
    answer: list[int]
    block: int
    emitted: int = 0
    stream: bool = False
    stats: FakeStats = field(default_factory=FakeStats)


@dataclass
class Out:
    request_id: str
    new_ids: list[int]
    finished: bool
    finish_reason: str | None
    result: object | None = None


def fake_answer(prompt_ids: list[int], gen_length: int) -> list[int]:
    return [prompt_ids[i % len(prompt_ids)] for i in range(gen_length)]


class FakeEngine:
    def __init__(self) -> None:
        self.queue: deque[FakeSeq] = deque()
        self.running: dict[str, FakeSeq] = {}
        self.aborted: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.thread_ids: set[int] = set()  # threads that called add/abort/step
        self.last_step = None

    def prepare(self, prompt_ids, config, request_id=None, stream=False) -> FakeSeq:
        if not prompt_ids:
            raise ConfigError("prompt: must not be empty")
        return FakeSeq(request_id or uuid.uuid4().hex, fake_answer(prompt_ids, config.gen_length), config.block_size,
                       stream=stream)

    def add(self, seq: FakeSeq) -> None:
        self.thread_ids.add(threading.get_ident())
        self.queue.append(seq)

    def abort(self, seq_id: str) -> None:
        self.thread_ids.add(threading.get_ident())
        self.aborted.append(seq_id)

    def has_work(self) -> bool:
        return bool(self.queue or self.running or self.aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    def step(self) -> list[Out]:
        self.thread_ids.add(threading.get_ident())
        self.gate.wait()
        if self.fail_next:
            raise RuntimeError("device lost")
        while self.queue:
            seq = self.queue.popleft()
            self.running[seq.id] = seq
        outs = []
        for seq_id in self.aborted:
            seq = self.running.pop(seq_id, None)
            if seq is not None:
                outs.append(Out(seq_id, [], True, "abort"))
        self.aborted.clear()
        for seq in list(self.running.values()):
            new = seq.answer[seq.emitted:seq.emitted + seq.block]
            seq.emitted += len(new)
            seq.stats.decode_forwards += 1
            seq.stats.branch_rows += 1
            done = seq.emitted == len(seq.answer)
            result = None
            if done:
                seq.stats.generated_tokens = len(seq.answer)
                result = SimpleNamespace(token_ids=seq.answer, stats=seq.stats)
                del self.running[seq.id]
            outs.append(Out(seq.id, new, done, "length" if done else None, result))
        self.last_step = SimpleNamespace(kind="decode", requests=len(outs), rows=len(outs), seconds=0.001)
        return outs


class Gated:
    """Wraps a real engine: step() waits while ``gate`` is cleared and raises once ``fail_next`` is set;
    with ``poison`` set, the next prepared request's strategy raises in accept (a bug in one request)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.poison = False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def prepare(self, *args, **kwargs):
        seq = self.engine.prepare(*args, **kwargs)
        if self.poison:
            self.poison = False

            def broken_accept(*_args):
                raise ValueError("strategy bug")

            seq.strategy.accept = broken_accept  # this one request only
        return seq

    def step(self):
        self.gate.wait()
        if self.fail_next:
            raise RuntimeError("device lost")
        return self.engine.step()
