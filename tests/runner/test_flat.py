"""The flat query axis: a step's requests back to back on one query axis (runner/step.py: flat_segments and
flatten), attending on the padded rows (cache.FlatView, ModelRunner.flat_body), equals the padded step."""

import dataclasses
import random

import pytest
import torch

import lopa
from lopa.decoding.base import ForwardBatch, PredictSpec
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import FIELDS, StepItem, flatten, pack, unpack, unpack_flat


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


def _random_step(loaded, rng: random.Random, trial: int):
    """A static "flex" runner of 4 slots of 256 positions over ``loaded``'s model in float64, its pool random (the
    prefixes), and a random packed step over slots trial % 2.. -> (runner, the pool's K/V before it, items, host)."""
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64, max_num_seqs=4,
                         max_positions=256, static=True, capture=False, attention="flex")
    runner.reserve(4, runner.slot_capacity())
    torch.manual_seed(trial)
    runner.pool.kv.normal_()
    items, host = _step(rng, 4, runner.pool.capacity, 16, first=trial % 2, vocab=loaded.model.config.vocab_size)
    return runner, runner.pool.kv.clone(), items, host


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_flat_body_equals_the_padded_body(family, tiny_dream_dir, tiny_llada_dir):
    """ModelRunner.flat_body over random packed steps (decode windows, rows of unequal lengths, block-causal rows,
    prompt prefills, rows over slots 1.. beside a running slot 0; segments back to back or padded to 8 or 64) gives
    every real query the hidden state of the padded static forward (``body`` under FlexAttention) in float64, and
    leaves the same K/V in the pool at every position a real query wrote, and the committed prefixes as they were."""
    folder = tiny_dream_dir if family == "dream" else tiny_llada_dir
    loaded = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype="float64")).loaded
    rng = random.Random(1)
    for trial in range(4):
        runner, prefixes, items, host = _random_step(loaded, rng, trial)
        cap, first = runner.pool.capacity, items[0].slot
        _, _, branch, _, P, _, _ = unpack(host)
        q_tile = (1, 8, 64, 1)[trial]
        T = _segments_total(branch, q_tile, trial % 2)
        with torch.inference_mode():
            padded = runner.body(host, first, cap, flex=True)  # [B, Qb, E]
            kv_padded = runner.pool.kv.clone()
            runner.pool.kv.copy_(prefixes)
            flat = flatten(host, T, q_tile, 99, first)
            hidden = runner.flat_body(host, flat, T, first)
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


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_attention_on_the_kernels_query_length_equals_the_unpadded(family, tiny_dream_dir, tiny_llada_dir):
    """Under FlexAttention a step's rows of Qb queries attend as rows of kernel_queries(Qb) (models/attention.py:
    from ModelRunner.kernel_pad_min on, the next power of two; the rest padding): ``body`` and ``flat_body`` so
    padded give every real query the hidden state of ``body`` unpadded, in float64, and write the same K/V."""
    from lopa.models.attention import kernel_queries

    assert [kernel_queries(q) for q in (32, 96, 256, 384, 512, 768, 6144)] == [32, 96, 256, 512, 512, 1024, 8192]
    assert kernel_queries(96, least=1) == 128 and kernel_queries(128, least=1) == 128
    folder = tiny_dream_dir if family == "dream" else tiny_llada_dir
    loaded = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype="float64")).loaded
    ops, lengths = loaded.model.ops, []  # the query lengths the attention kernel sees (a compile each on a GPU)
    groups = loaded.model.config.num_heads // loaded.model.config.num_kv_heads
    flex = ops.flex
    loaded.model.ops = dataclasses.replace(ops, flex=lambda q, *a, **kw: lengths.append(q.shape[2] // groups)
                                           or flex(q, *a, **kw))
    rng = random.Random(2)
    padded_any = False
    for trial in range(4):
        runner, prefixes, items, host = _random_step(loaded, rng, trial)
        cap, first = runner.pool.capacity, items[0].slot
        _, _, branch, _, P, _, _ = unpack(host)
        Qb = branch.shape[1]
        padded_any |= kernel_queries(Qb, 1) > Qb
        T = _segments_total(branch, 1, 0)
        with torch.inference_mode():
            runner.kernel_pad_min = 10 ** 9  # no padding
            lengths.clear()
            want = runner.body(host, first, cap, flex=True)
            kv_want = runner.pool.kv.clone()
            assert set(lengths) == {Qb}
            runner.kernel_pad_min = 1  # every bucket padded to a power of two
            runner.pool.kv.copy_(prefixes)
            lengths.clear()
            got = runner.body(host, first, cap, flex=True)
            assert set(lengths) == {kernel_queries(Qb, 1)}
            kv_got = runner.pool.kv.clone()
            runner.pool.kv.copy_(prefixes)
            flat = flatten(host, T, 1, 99, first)
            hidden = runner.flat_body(host, flat, T, first)
        start = unpack_flat(flat, T)[7]
        assert got.shape == want.shape
        for b, item in enumerate(items):
            Q = int((torch.arange(1, Qb + 1) * (branch[b] >= 0)).amax())  # its segment: to its last real query
            real = branch[b, :Q] >= 0
            torch.testing.assert_close(got[b, :Q][real], want[b, :Q][real], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(hidden[0, int(start[b]):int(start[b]) + Q][real], want[b, :Q][real],
                                       rtol=1e-10, atol=1e-10)
            written = int(P[b]) + torch.arange(Q)[real]
            s = first + b
            for kv in (kv_got, runner.pool.kv):
                torch.testing.assert_close(kv[:, :, s, :, written], kv_want[:, :, s, :, written], rtol=1e-10,
                                           atol=1e-10)
    assert padded_any  # some step's Qb was not a power of two already
