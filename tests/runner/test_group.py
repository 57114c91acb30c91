"""The engine's side of a group (runner/group.py) in one process: LocalGroup records nothing, runs each step
directly and lets the engine go on only after an out-of-memory. The device path's row split (rows_of) and its
inverse (in_row_order) against split_rows."""

import pytest
import torch

from lopa.runner.group import LocalGroup, in_row_order, rows_of, split_rows


def test_local_group_runs_the_step_directly_and_records_nothing():
    group = LocalGroup()
    group.record(("abort", "req-0"))
    assert group.step(lambda: ["out"]) == ["out"]
    with pytest.raises(ValueError, match="bad step"):
        group.step(lambda: (_ for _ in ()).throw(ValueError("bad step")))
    assert group.step(lambda: 7) == 7  # a step that raised leaves nothing behind
    assert group.counters.prepare_s == 0.0 and group.counters.control_bytes == 0


def test_local_group_survives_only_an_out_of_memory_and_follows_no_one():
    group = LocalGroup()
    assert group.survives(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    assert not group.survives(RuntimeError("a device assert"))
    with pytest.raises(RuntimeError, match="no rank 0 to follow"):
        group.follow(lambda event: None, lambda: None)


def test_rows_of_is_split_rows_on_the_device():
    K = torch.arange(10)
    for world in range(1, 5):
        for rank in range(world):
            first, count = rows_of(K, rank, world)
            want = [split_rows(k, world)[rank] for k in range(10)]
            assert (first.tolist(), count.tolist()) == ([r.start for r in want], [len(r) for r in want]), (world, rank)


def test_in_row_order_puts_every_ranks_rows_back_in_global_order():
    """Each rank packs its split_rows share of every slot (local row i at query i*W + c); a replicated row (K = 1)
    differs per rank and is read from the caller's own copy."""
    K, W = torch.tensor([0, 1, 2, 3, 5, 8, 9]), torch.tensor([0, 4, 3, 2, 3, 1, 2])
    B = len(K)
    full = torch.arange(B * 40 * 3, dtype=torch.float64).view(B, 40, 3)  # [B, Qg, 3] the rows in global order
    for world in range(1, 5):
        Qb = max(-(-int(k) // world) * int(w) for k, w in zip(K, W))
        packed = torch.full((world, B, Qb, 3), -1.0, dtype=torch.float64)
        for r in range(world):
            for b, (k, w) in enumerate(zip(K.tolist(), W.tolist())):
                rows = split_rows(k, world)[r]
                packed[r, b, :len(rows) * w] = full[b, rows.start * w:rows.stop * w] + (1000 * r if k == 1 else 0)
        for rank in range(world):
            got = in_row_order(packed, K, W, rank)
            assert got.shape == (B, world * Qb, 3)
            for b, (k, w) in enumerate(zip(K.tolist(), W.tolist())):
                want = full[b, :k * w] + (1000 * rank if k == 1 else 0)
                assert torch.equal(got[b, :k * w], want), (world, rank, b)

