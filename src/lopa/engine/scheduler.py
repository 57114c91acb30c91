"""Which requests run in the next engine step. Plain Python bookkeeping: no torch, testable without a model.

- FIFO admission while fewer than ``max_num_seqs`` run and the pool for all of them stays in the KV budget
  (``fits(slots, positions)``, the runner's). A request holds a whole KV slot from admission to its end (its
  ``need`` was checked against the slot capacity and the budget before it was queued, so it always fits
  alone), so a running request never runs out of KV and nothing is ever preempted.
- Running requests sit in slots 0..n-1, in slot order (dense). When some leave, the requests in the highest
  slots move into the gaps (``Plan.moves``, applied by the runner before the step's forward).
- A step is a prefill step (the admitted requests whose next forward is their prompt prefill, all in one
  forward) or a decode step (every running request, or the first of them under the step budget below; one
  forward). Admitted requests go to the tail in an
  order that puts those needing a prefill first, so every step's slots are one contiguous range, and a
  decode step's are exactly 0..m-1 (fixed addresses for CUDA graphs).
- Admission happens only when no running request waits for its prefill, and while requests decode at most
  every other step, so arrivals never starve running requests.
- The step budget (``take``, the runner's warmed shapes after the start-up warm-up: B bucket x query bucket <=
  RunnerConfig.max_num_batched_tokens): a decode step runs the first ``take(running)`` requests, slots 0..m-1;
  when that leaves some waiting, the next schedule rotates the running order (those that waited first, in slot
  order, then those that ran): no running request runs twice while another waits, so with m of n running each
  one runs at least once in every ceil(n / m) decode steps. The moves of a schedule (compaction and rotation)
  are one simultaneous permutation: every source slot is read before any destination is written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .sequence import Sequence, Status


@dataclass
class Plan:
    seqs: list[Sequence]  # in slot order; their slots form one contiguous range
    prefill: bool
    moves: list[tuple[int, int]] = field(default_factory=list)  # (from slot, to slot), applied before the forward,
    # all at once (a rotation moves a request into a slot another one leaves in the same plan)
    deferred: int = 0  # a decode step: running requests that wait this step (the step budget; module docstring)


class Scheduler:
    def __init__(self, max_num_seqs: int, fits: Callable[[int, int], bool] | None = None,
                 take: Callable[[list[Sequence]], int] | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.fits = fits  # (slots, KV positions per slot) -> whether such a pool stays in the budget; None = always
        self.take = take  # running requests in slot order -> how many of the first the decode step runs; None = all
        self._ran: set[Sequence] = set()  # the last decode step's requests, when it left others waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admitted_last = False  # the previous plan admitted requests (its prefill step runs next)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence) -> None:
        """The request is done (or aborted): its slot is freed at the next schedule()."""
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s.status is Status.RUNNING for s in self.running)

    def _compact(self) -> None:
        live = [s for s in self.running if s.status is Status.RUNNING]
        n = len(live)
        gaps = sorted(s.slot for s in self.running if s.status is not Status.RUNNING and s.slot < n)
        movers = sorted((s for s in live if s.slot >= n), key=lambda s: s.slot)
        for gap, seq in zip(gaps, movers):
            seq.slot = gap
        for seq in self.running:
            if seq.status is not Status.RUNNING:
                seq.slot = None
        self.running = sorted(live, key=lambda s: s.slot)

    def _rotate(self) -> None:
        """After a decode step that left requests waiting: they go first (slot order), those that ran after them."""
        if self._ran:
            self.running.sort(key=lambda s: s in self._ran)  # stable
            for slot, seq in enumerate(self.running):
                seq.slot = slot
            self._ran = set()

    def _admit(self) -> None:
        group: list[Sequence] = []
        need = max((s.need for s in self.running), default=0)
        while self.waiting and len(self.running) + len(group) < self.max_num_seqs:
            need = max(need, self.waiting[0].need)
            if self.fits is not None and not self.fits(len(self.running) + len(group) + 1, need):
                break  # FIFO: the head waits for room (alone it always fits), nobody overtakes it
            group.append(self.waiting.popleft())
        group.sort(key=lambda s: not s.prefill_pending)  # stable: FIFO within each kind
        for seq in group:
            seq.status, seq.slot = Status.RUNNING, len(self.running)
            self.running.append(seq)

    def schedule(self) -> Plan:
        before = {s: s.slot for s in self.running if s.status is Status.RUNNING}
        self._compact()
        self._rotate()
        moves = [(slot, s.slot) for s, slot in before.items() if s.slot != slot]
        decoding = any(not s.prefill_pending for s in self.running)
        if not any(s.prefill_pending for s in self.running) and not (decoding and self._admitted_last):
            n = len(self.running)
            self._admit()
            self._admitted_last = len(self.running) > n
        else:
            self._admitted_last = False
        prefill = [s for s in self.running if s.prefill_pending]
        if prefill:
            return Plan(prefill, True, moves)
        m = self.take(self.running) if self.take is not None and self.running else len(self.running)
        if m < len(self.running):
            self._ran = set(self.running[:m])
        return Plan(self.running[:m], False, moves, len(self.running) - m)
