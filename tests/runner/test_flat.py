"""The flat query axis: a step's requests back to back on one query axis over the whole pool (runner/step.py:
flat_segments and flatten, models/attention.py: flat_block_mask, cache.FlatView, ModelRunner.flat_body) equals the
padded step."""

import random

import pytest
import torch

import lopa
from lopa.decoding.base import ForwardBatch, PredictSpec
from lopa.models.attention import flat_block_mask, step_mask
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import FIELDS, StepItem, flat_segments, flatten, pack, unpack, unpack_flat


def _step(rng: random.Random, slots: int, cap: int, size: int, first: int = 0, vocab: int = 200):
    """A packed step (runner/step.py) over slots first..: decode rows of K x W windows, some with rows of unequal
    lengths (padding columns inside K x W) or block ids, prompt prefills (one branch over the prompt), and
    rows past the items all padding, at prefixes that leave room in a slot of ``cap`` positions."""
    items = []
    for slot in range(first, first + rng.randint(1, slots - first)):
        kind = rng.choice(["window", "lengths", "blocks", "prefill"])
        K, W = (1, rng.randint(1, 3 * size + 5)) if kind == "prefill" else (rng.randint(1, 5), rng.randint(1, 2 * size))
        lengths = tuple(rng.randint(0, W) for _ in range(K)) if kind == "lengths" else None
        blocks = (torch.arange(W) + rng.randint(0, 3)) // rng.randint(1, 4) if kind == "blocks" else None
        P = 0 if kind == "prefill" else rng.randint(0, cap - K * W - 1)
        tokens = torch.tensor([[rng.randrange(1, vocab) for _ in range(W)] for _ in range(K)])
        batch = ForwardBatch(tokens, P, torch.arange(0), block_ids=blocks, lengths=lengths, prefill=kind == "prefill")
        items.append(StepItem(slot, batch, PredictSpec()))
    Qb = max(item.queries for item in items) + rng.choice([0, rng.randint(1, size)])
    host = torch.zeros(len(items) + rng.randint(0, 1), FIELDS * Qb + 3, dtype=torch.long)
    pack(items, host, 99)
    return items, host


def _segments_total(branch: torch.Tensor, q_tile: int, extra: int) -> int:
    Q = ((torch.arange(1, branch.shape[1] + 1) * (branch >= 0)).amax(1))
    return int(((Q + q_tile - 1) // q_tile * q_tile).sum()) + extra * q_tile


@pytest.mark.parametrize("seed", range(8))
def test_flat_block_mask_lists_exactly_each_requests_step_mask(seed):
    """The flat mask, evaluated over the tiles it lists (full ones whole, partial ones by mask_mod), gives every
    real query of row b, query head group g and KV head h exactly step_mask's row over slot first + b, head h: and
    nothing anywhere else in the pool; no tile is listed twice; a tile without a real query reads key 0 only."""
    rng = random.Random(seed)
    size, q_tile = 16, rng.choice([8, 16])
    slots, cap, Hkv, groups = 4, 256, rng.choice([1, 2]), rng.choice([1, 3])
    first = rng.randint(0, 1)
    _, host = _step(rng, slots, cap, size, first)
    _, _, branch, block, P, _, _ = unpack(host)
    B, Qb = branch.shape
    T = _segments_total(branch, q_tile, rng.randint(0, 2))
    Q, start, owner, qidx = flat_segments(branch, T, q_tile)
    q = qidx.clamp(max=Qb - 1)
    real = (qidx < Qb) & (branch[owner, q] >= 0)
    slot = first + torch.arange(B)
    bm = flat_block_mask(slot, P, start, Q, owner, torch.where(real, branch[owner, q], -1),
                         torch.where(real, block[owner, q], 0), slots, cap, Hkv, groups=groups, q_tile=q_tile,
                         size=size)
    keys = slots * Hkv * cap
    assert bm.kv_num_blocks.shape == (1, Hkv, groups * T // q_tile) and bm.shape[-1] == keys
    want = step_mask(P, branch, block, cap)  # [B, Qb, cap]
    kv = torch.arange(keys)
    for h in range(Hkv):
        got = torch.zeros(groups * T, keys, dtype=torch.bool)
        for m in range(groups * T // q_tile):
            rows = torch.arange(m * q_tile, (m + 1) * q_tile)
            full = bm.full_kv_indices[0, h, m, :int(bm.full_kv_num_blocks[0, h, m])].tolist()
            part = bm.kv_indices[0, h, m, :int(bm.kv_num_blocks[0, h, m])].tolist()
            assert not set(full) & set(part) and len(set(part)) == len(part) and len(set(full)) == len(full)
            for t in full:
                got[rows, t * size:(t + 1) * size] = True
            for t in part:
                cols = kv[t * size:(t + 1) * size]
                got[rows[:, None], cols] = bm.mask_mod(torch.tensor(0), torch.tensor(h), rows[:, None], cols[None, :])
            base = (int(slot[owner[m * q_tile % T]]) * Hkv + h) * cap
            assert all(base // size <= t < (base + cap) // size for t in full + part)  # its own slot and head only
            if not real[rows % T].any():
                assert full == [] and part == [base // size]
        for i in range(groups * T):
            t = i % T
            b = int(owner[t])
            base = (int(slot[b]) * Hkv + h) * cap
            if not real[t]:  # its slot's position 0, and nothing outside the slot's prefix
                seen = got[i].nonzero().flatten()
                assert seen[0] == base and (seen < base + int(P[b])).all() | (seen == base).all(), (h, i)
                continue
            expect = torch.zeros(keys, dtype=torch.bool)
            expect[base:base + cap] = want[b, int(qidx[t])]
            assert torch.equal(got[i], expect), (h, i)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_flat_body_equals_the_padded_body(family, tiny_dream_dir, tiny_llada_dir):
    """ModelRunner.flat_body over random packed steps (decode windows, rows of unequal lengths, block-causal rows,
    prompt prefills, rows over slots 1.. beside a running slot 0) gives every real query the hidden state of the
    padded static forward (``body`` under FlexAttention) in float64, and leaves the same K/V in the pool at every
    position a real query wrote, and the committed prefixes as they were."""
    folder = tiny_dream_dir if family == "dream" else tiny_llada_dir
    loaded = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype="float64")).loaded
    rng = random.Random(1)
    for trial in range(4):
        runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64, max_num_seqs=4,
                             max_positions=256, static=True, capture=False, attention="flex")
        runner.reserve(4, runner.slot_capacity())
        cap = runner.pool.capacity
        torch.manual_seed(trial)
        runner.pool.kv.normal_()
        prefixes = runner.pool.kv.clone()
        items, host = _step(rng, 4, cap, 16, first=trial % 2, vocab=loaded.model.config.vocab_size)
        first = items[0].slot
        _, _, branch, _, P, _, _ = unpack(host)
        T = _segments_total(branch, 64, trial % 2)
        with torch.inference_mode():
            padded = runner.body(host, first, cap, flex=True)  # [B, Qb, E]
            kv_padded = runner.pool.kv.clone()
            runner.pool.kv.copy_(prefixes)
            flat = flatten(host, T, 64, 99, first)
            hidden = runner.flat_body(flat, T, q_tile=64)
        owner, start = unpack_flat(flat, T)[4], unpack_flat(flat, T)[7]
        assert hidden.shape == (1, T, padded.shape[-1])
        for b, item in enumerate(items):
            Q = item.queries
            real = branch[b, :Q] >= 0
            torch.testing.assert_close(hidden[0, int(start[b]):int(start[b]) + Q][real], padded[b, :Q][real],
                                       rtol=1e-10, atol=1e-10)
            assert torch.equal(owner[int(start[b]):int(start[b]) + Q], torch.full((Q,), b))
            written = int(P[b]) + torch.arange(Q)[real]
            s = first + b
            torch.testing.assert_close(runner.pool.kv[:, :, s, :, written], kv_padded[:, :, s, :, written],
                                       rtol=1e-10, atol=1e-10)
            assert torch.equal(runner.pool.kv[:, :, s, :, :int(P[b])], prefixes[:, :, s, :, :int(P[b])])
        if first:  # the running slot 0 keeps every position but its trash one
            assert torch.equal(runner.pool.kv[:, :, 0, :, :cap - 1], prefixes[:, :, 0, :, :cap - 1])
