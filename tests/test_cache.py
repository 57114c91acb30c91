"""The KV pool: zeroed at allocation, multi-slot commit copies, compaction moves and growth keep what is committed."""

import torch

from lopa.cache import KVPool


def _pool(slots=3, cap=16):
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=4, hidden_size=8, slots=slots, capacity=cap, device="cpu",
                  dtype=torch.float32)
    assert not pool.kv.any() and not pool.last_hidden.any()
    pool.kv.normal_()
    pool.last_hidden.normal_()
    return pool


def test_commit_copies_each_slots_winner_columns():
    pool = _pool()
    before = pool.kv.clone()
    slots = torch.tensor([0, 0, 2, 2, 2])
    src = torch.tensor([9, 10, 12, 13, 14])
    dst = torch.tensor([3, 4, 5, 6, 7])
    trash = torch.tensor([15, 15])  # idle entries (the device path's): the trash position onto itself, repeated
    pool.commit(torch.cat([slots, torch.tensor([1, 1])]), torch.cat([src, trash]), torch.cat([dst, trash]))
    want = before.clone()
    for s, a, b in zip(slots.tolist(), src.tolist(), dst.tolist()):
        want[:, :, s, :, b] = before[:, :, s, :, a]
    assert torch.equal(pool.kv, want)  # every winner column copied, every other position (other slots too) kept


def test_move_and_resize_keep_committed_kv_and_last_hidden():
    pool = _pool()
    pool.lengths = [5, 0, 7]
    slot2, hidden2 = pool.kv[:, :, 2, :, :7].clone(), pool.last_hidden[2].clone()
    pool.move([(2, 1)])
    assert pool.lengths == [5, 7, 0]
    assert torch.equal(pool.kv[:, :, 1, :, :7], slot2) and torch.equal(pool.last_hidden[1], hidden2)
    slot0, hidden0 = pool.kv[:, :, 0, :, :5].clone(), pool.last_hidden[0].clone()
    pool.move([(0, 1), (1, 0)])  # a swap: both sources read before either is written
    assert pool.lengths == [7, 5, 0]
    assert torch.equal(pool.kv[:, :, 0, :, :7], slot2) and torch.equal(pool.kv[:, :, 1, :, :5], slot0)
    assert torch.equal(pool.last_hidden[0], hidden2) and torch.equal(pool.last_hidden[1], hidden0)
    pool.move([(1, 0), (0, 1)])  # and back
    slot0 = pool.kv[:, :, 0, :, :5].clone()
    big = pool.resized(slots=5, capacity=32)
    assert big.slots == 5 and big.capacity == 32 and big.lengths == [5, 7, 0, 0, 0]
    assert torch.equal(big.kv[:, :, 0, :, :5], slot0) and torch.equal(big.kv[:, :, 1, :, :7], slot2)
    assert not big.kv[:, :, 3:].any()  # new slots start zeroed
    small = big.resized(slots=2, capacity=8)  # shrinking keeps the live slots (0..1) and their committed prefix
    assert small.slots == 2 and small.capacity == 8 and small.lengths == [5, 7]
    assert torch.equal(small.kv[:, :, 1, :, :7], slot2) and torch.equal(small.last_hidden[1], hidden2)


def test_a_view_writes_each_query_where_it_belongs_without_copying_the_projections():
    """The attention's cache write (models/fused.py: rope_write, through CacheView.rows and .index) puts request b's
    query q of KV head h at slot first + b, position write_index[b, q]: k RoPE'd, v as it is, both as the attention
    hands them over, [B, Hkv, Qb, D] views of the projection's [B, Qb, Hkv, D] (no copy of them on the way: the index
    runs in their memory order). Other slots and positions are untouched; CacheView.keys reads the slots."""
    from lopa.models.fused import EAGER, rope
    from lopa.models.transformer import rope as tables

    pool = _pool(slots=4, cap=16)
    before = pool.kv.clone()
    B, Qb, Hkv, D = 2, 3, 2, 4
    k, v = (torch.randn(B, Qb, Hkv, D).transpose(1, 2) for _ in range(2))  # as models/transformer.py makes them
    cos, sin = tables(torch.arange(Qb)[None].expand(B, Qb) + 5, D, 1e4)
    write_index = torch.tensor([[2, 3, 15], [0, 7, 8]])
    view = pool.view(1, B, 16, write_index)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        EAGER.rope_write(*view.rows(1), view.index, k, v, cos, sin)
    assert not {e.name for e in prof.events()} & {"aten::clone", "aten::contiguous", "aten::copy_"}
    roped = rope(k, cos, sin)
    want = before.clone()
    for b in range(B):
        for q in range(Qb):
            want[0, 1, 1 + b, :, int(write_index[b, q])] = roped[b, :, q]
            want[1, 1, 1 + b, :, int(write_index[b, q])] = v[b, :, q]
    assert torch.equal(pool.kv, want)
    keys, values = view.keys(1)
    assert torch.equal(keys, pool.kv[0, 1, 1:3]) and torch.equal(values, pool.kv[1, 1, 1:3])
