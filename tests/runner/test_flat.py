"""The flat query axis: a step's requests back to back on one query axis (runner/step.py: flat_segments and
flatten), attending on the padded rows (cache.FlatView, ModelRunner.flat_body), equals the padded step."""

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
