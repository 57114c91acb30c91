"""The scheduler without a model: FIFO admission, dense slots after random joins and leaves, the moves that
keep them dense (replayed on a toy slot array), prefill steps before decode steps, and the step budget: decode
steps of the first requests only, the running order rotated so that none waits long."""

import random
from types import SimpleNamespace

from lopa.engine.scheduler import Scheduler
from lopa.engine.sequence import Sequence, Status


def _seq(i: int, prefill: bool = True) -> Sequence:
    seq = Sequence(f"r{i}", [1], None, None, None, None, need=8)
    seq.batch = SimpleNamespace(prefill=prefill)
    return seq


def _replay(toy: dict, moves: list[tuple[int, int]]) -> None:
    """Plan.moves on a toy slot array, all at once: every source is read before any destination is written."""
    held = {src: toy.pop(src) for src, _ in moves}
    for src, dst in moves:
        assert dst not in toy  # a destination is free, or left by a source of the same plan
        toy[dst] = held[src]


def test_fifo_admission_under_max_num_seqs_and_prefill_first():
    sched = Scheduler(max_num_seqs=2)
    seqs = [_seq(0), _seq(1, prefill=False), _seq(2)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill and [s.id for s in plan.seqs] == ["r0"]  # admitted r0, r1; r0's prefill runs alone
    assert [s.id for s in sched.running] == ["r0", "r1"] and [s.slot for s in sched.running] == [0, 1]
    seqs[0].batch = SimpleNamespace(prefill=False)
    plan = sched.schedule()
    assert not plan.prefill and [s.slot for s in plan.seqs] == [0, 1]
    assert list(sched.waiting) == [seqs[2]]  # no room yet


def test_random_joins_and_leaves_keep_slots_dense_and_moves_replay():
    rng = random.Random(0)
    sched = Scheduler(max_num_seqs=5)
    toy = {}  # slot -> sequence id held there (what the KV pool would hold)
    count = 0
    for _ in range(300):
        for _ in range(rng.randint(0, 2)):
            sched.add(_seq(count, prefill=rng.random() < 0.7))
            count += 1
        for s in list(sched.running):
            if s.status is Status.RUNNING and rng.random() < 0.2:
                sched.finish(s)
                toy.pop(s.slot)
        plan = sched.schedule()
        _replay(toy, plan.moves)
        for s in sched.running:
            toy.setdefault(s.slot, s.id)  # newly admitted
        assert [s.slot for s in sched.running] == list(range(len(sched.running)))
        assert {slot: sid for slot, sid in toy.items()} == {s.slot: s.id for s in sched.running}
        slots = [s.slot for s in plan.seqs]
        assert slots == list(range(slots[0], slots[0] + len(slots))) if slots else True
        if plan.seqs and not plan.prefill:
            assert slots == list(range(len(sched.running)))
        for s in plan.seqs:  # a prefill step is followed by decoding
            s.batch = SimpleNamespace(prefill=False)


def test_step_budget_runs_the_first_requests_and_rotates_so_none_waits_long():
    """take(): the decode step runs slots 0..m-1 only; the next schedule puts those that waited first, so over any
    ceil(n / m) consecutive decode steps every running request runs; the moves (a permutation of live slots)
    replay on a toy slot array; requests joining and leaving on the way."""
    rng = random.Random(1)
    sched = Scheduler(max_num_seqs=7, take=lambda seqs: min(len(seqs), 3))
    toy, count, waited = {}, 0, {}
    for step in range(400):
        for _ in range(rng.randint(0, 1)):
            sched.add(_seq(count, prefill=rng.random() < 0.5))
            count += 1
        for s in list(sched.running):
            if s.status is Status.RUNNING and not s.prefill_pending and rng.random() < 0.05:
                sched.finish(s)
                toy.pop(s.slot)
                waited.pop(s.id, None)
        plan = sched.schedule()
        _replay(toy, plan.moves)
        for s in sched.running:
            toy.setdefault(s.slot, s.id)
        assert toy == {s.slot: s.id for s in sched.running}
        if plan.prefill:
            for s in plan.seqs:
                s.batch = SimpleNamespace(prefill=False)
            continue
        n = len(sched.running)
        assert [s.slot for s in plan.seqs] == list(range(min(n, 3))) and plan.deferred == n - len(plan.seqs)
        for s in sched.running:  # decode steps each running request sat out in a row
            waited[s.id] = 0 if s in plan.seqs else waited.get(s.id, 0) + 1
            assert waited[s.id] < -(-7 // 3), (step, s.id)
    assert count > 100
