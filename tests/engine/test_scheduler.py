"""The scheduler without a model: FIFO admission, dense slots after random joins and leaves, the moves that
keep them dense (replayed on a toy slot array), prefill steps before decode steps."""

import random
from types import SimpleNamespace

from lopa.engine.scheduler import Scheduler
from lopa.engine.sequence import Sequence, Status


def _seq(i: int, prefill: bool = True) -> Sequence:
    seq = Sequence(f"r{i}", [1], None, None, None, None, need=8)
    seq.batch = SimpleNamespace(prefill=prefill)
    return seq


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
        for src, dst in plan.moves:
            assert dst not in toy
            toy[dst] = toy.pop(src)
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
