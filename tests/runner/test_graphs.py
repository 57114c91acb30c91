"""The static decode path behind CUDA graphs: its batched predict and its mask equal the eager ones."""

import dataclasses

import pytest
import torch

import lopa
from lopa.engine import Engine
from lopa.models import attention
from lopa.models.attention import branch_mask, step_mask
from lopa.runner import graphs
from lopa.runner.model_runner import ModelRunner


def test_static_path_with_fused_kernels_matches_eager(tiny_dream_dir, monkeypatch):
    """fuse=True compiles the batched confidence pass; the eager backend checks that it traces whole."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2, static=True,
                         capture=False, fuse=True)
    assert runner.graphs.predict is not graphs.predict_rows
    fused = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    cfgs = [lopa.DecodeConfig(strategy="lopa", k=3, gen_length=40, block_size=8, tau=0.5, trace=True),
            lopa.DecodeConfig(strategy="lopa", k=2, gen_length=24, block_size=8, tau=0.5, confidence="margin", trace=True)]
    prompts = ["Tom has 12 apples and", "The cat"]
    ref = [lopa.generate(model, p, c) for p, c in zip(prompts, cfgs)]
    got = lopa.generate_many(fused, prompts, cfgs)
    assert runner.graphs.statics, "the static path was not exercised"
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids and [s.winner for s in a.trace] == [s.winner for s in b.trace]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager_on_gpu(tiny_dream_dir):
    """Batched graph replay equals batched eager on the GPU in float32 (the tiny model): the host strategies' path
    (the device path's captured step: tests/engine/test_device_step.py)."""
    fast = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                    device_step=False))
    slow = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False,
                                                                    max_num_seqs=4, device_step=False))
    prompts = ["Tom has 12 apples and", "The cat sat", "A B C", "one two"]
    for strategy in ("d2f", "lopa"):
        a = lopa.generate_many(slow, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        b = lopa.generate_many(fast, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert fast.runner.graphs.statics and all(s.graph is not None for s in fast.runner.graphs.statics.values())


@pytest.mark.parametrize("seed", range(6))
def test_step_mask_equals_branch_mask_per_request(seed):
    """For random mixes of requests (K, W, P, block ids, row lengths) the device-built step mask, on each
    request's real queries, is branch_mask embedded in the key span; padding queries read key 0 only."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    reqs = []
    for _ in range(rand(1, 5)):
        K, W, P = rand(1, 5), rand(1, 12), rand(0, 20)
        blocks = torch.sort(torch.randint(0, 3, (W,), generator=g)).values if rand(0, 2) else None
        lengths = tuple(rand(1, W + 1) for _ in range(K)) if rand(0, 3) == 0 else None
        if lengths is not None:
            lengths = lengths[:-1] + (W,)
        reqs.append((K, W, P, blocks, lengths))
    Qb = graphs.round_up(max(K * W for K, W, *_ in reqs), 8)
    Lb = max(P + Qb for _, _, P, *_ in reqs) + 3
    B = len(reqs) + 1  # one all-padding row
    branch = torch.full((B, Qb), -1)
    block = torch.zeros(B, Qb, dtype=torch.long)
    P_ = torch.zeros(B, dtype=torch.long)
    for b, (K, W, P, blocks, lengths) in enumerate(reqs):
        rows = torch.arange(K).repeat_interleave(W)
        cols = torch.arange(W).repeat(K)
        if lengths is not None:
            rows = torch.where(cols < torch.tensor(lengths).repeat_interleave(W), rows, -1)
        branch[b, :K * W] = rows
        if blocks is not None:
            block[b, :K * W] = blocks.repeat(K)
        P_[b] = P
    mask = step_mask(P_, branch, block, Lb)
    assert mask.any(-1).all()  # no query row is fully masked
    for b, (K, W, P, blocks, lengths) in enumerate(reqs):
        ref = branch_mask(P, K, W, blocks, lengths)  # [K*W, P + K*W]
        real = branch[b, :K * W] >= 0
        assert torch.equal(mask[b, :K * W, :P + K * W][real], ref[real])
        assert not mask[b, :K * W, P + K * W:][real].any()
    pad = branch < 0
    assert torch.equal(mask[pad], (torch.arange(Lb) == 0).expand(int(pad.sum()), Lb))


def _random_step(seed: int, size: int):
    """Packed-step metadata of a few random requests: P [B], branch and block [B, Qb] (the layout of step.py)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    B, Qb = rand(1, 4), rand(1, 3 * size)
    P = torch.tensor([rand(1, 5 * size) for _ in range(B)])
    branch = torch.full((B, Qb), -1)
    block = torch.zeros(B, Qb, dtype=torch.long)
    for b in range(B):
        K, W = rand(1, 4), rand(1, max(2, Qb // 3))
        Q = min(K * W, Qb)
        branch[b, :Q] = torch.arange(K).repeat_interleave(W)[:Q]
        block[b, :Q] = torch.sort(torch.randint(0, 3, (W,), generator=g)).values.repeat(K)[:Q]
    return P, branch, block, graphs.round_up(int(P.max()) + Qb + 1, size)


@pytest.mark.parametrize("seed,groups", [(s, 1 + s % 3) for s in range(8)])
def test_block_mask_tiles_cover_exactly_the_step_mask(seed, groups):
    """What the compiled FlexAttention kernel computes from the block mask (full tiles: every key; partial tiles:
    mask_mod; other tiles skipped) equals step_mask on every real query, and the skipped tiles start at the end of
    each request's window: the kernel's work follows the real key span, not the capacity. (The eager
    FlexAttention on a CPU ignores the tiles, so this is checked here, on the tile lists themselves.) With
    ``groups`` query heads per KV head on the query axis, each repeats the step's queries."""
    size = 16
    P, branch, block, cap = _random_step(seed, size)
    bm = attention.step_block_mask(P, branch, block, cap, size, groups=groups)
    B, Qb = branch.shape
    want = step_mask(P, branch, block, cap).repeat(1, groups, 1)  # [B, groups * Qb, cap]
    kv, q = torch.arange(cap), torch.arange(groups * Qb)
    for b in range(B):
        got = torch.zeros(groups * Qb, cap, dtype=torch.bool)
        qt = 0  # every query tile has the same lists (per request)
        full = bm.full_kv_indices[b, 0, qt, :int(bm.full_kv_num_blocks[b, 0, qt])]
        part = bm.kv_indices[b, 0, qt, :int(bm.kv_num_blocks[b, 0, qt])]
        assert not set(full.tolist()) & set(part.tolist())
        for t in full.tolist():
            got[:, t * size:(t + 1) * size] = True
        for t in part.tolist():
            keys = kv[t * size:(t + 1) * size]
            got[:, keys] = bm.mask_mod(torch.tensor(b), 0, q[:, None], keys[None, :])
        real = (branch[b] >= 0).repeat(groups)
        assert torch.equal(got[real], want[b][real])
        covered = (full.tolist() + part.tolist())
        assert max(covered) + 1 == -(-(int(P[b]) + Qb) // size)  # nothing past the window's last tile
        assert (bm.kv_num_blocks[b] == bm.kv_num_blocks[b, 0, 0]).all()


@pytest.mark.parametrize("attn", ["flex", "sdpa"])
def test_static_keys_do_not_depend_on_lengths_under_flex(tiny_dream_dir, attn):
    """Under "flex" a static key holds no prefix length: requests with prompts of very different lengths reuse
    one graph key; under "sdpa" the key span Lb is part of the key. Tokens equal the eager path in both."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=1, static=True,
                         capture=False, attention=attn, max_positions=1024)  # a fixed pool: no graph is dropped
    static = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 1))
    cfg = lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8, tau=0.5)
    prompts = ["a b", "Tom has 12 apples and " * 30]
    assert [r.token_ids for r in lopa.generate_many(static, prompts, cfg)] == \
        [lopa.generate(model, p, cfg).token_ids for p in prompts]
    spans = {key[2] for key in runner.graphs.statics}
    assert (spans == {runner.slot_capacity()}) if attn == "flex" else len(spans) > 1


def test_warmup_captures_every_key_and_then_nothing_new(tiny_dream_dir):
    """After warmup() the static path never adds a key: steps whose key was not warmed run eagerly (counted), and
    the engine's counters report no capture after start-up. CPU: the bodies run once instead of a capture."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2,
                         max_positions=512, static=True, capture=False, attention="flex")
    stats = runner.warmup(max_tokens=64)
    keys = set(runner.graphs.statics)
    assert stats.warmup_graphs == len(keys) == 3  # (B, Qb) in (1, 32), (1, 64), (2, 32): B * Qb <= 64
    warm = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    cfgs = [lopa.DecodeConfig(strategy="d2f", gen_length=16, block_size=8, tau=0.5),
            lopa.DecodeConfig(strategy="lopa", k=7, gen_length=16, block_size=8, tau=0.5)]  # 8 rows: past 64 queries
    got = lopa.generate_many(warm, ["Tom has 12 apples and", "The cat"], cfgs)
    assert [r.token_ids for r in got] == [lopa.generate(model, p, c).token_ids
                                          for p, c in zip(["Tom has 12 apples and", "The cat"], cfgs)]
    assert set(runner.graphs.statics) == keys
    c = warm.engine.counters
    assert c.captures_after_start == 0 and c.eager_decode_steps > 0
    assert c.as_dict()["eager_decode_steps"] == c.eager_decode_steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="start-up capture needs a GPU")
def test_load_model_warms_up_and_nothing_compiles_or_captures_after(tiny_dream_dir):
    """On a GPU load_model captures the graph set; then varied prompts and k run with torch.compile set to fail on
    any recompile, and the counters report no capture or recompile after start-up."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                     max_num_batched_tokens=2048, warmup=True))
    assert model.runner.graphs.attention == "flex"  # "auto" with the warm-up
    stats = model.runner.graphs.stats
    assert stats.warmup_graphs > 0 and stats.captures == stats.warmup_graphs
    prompts = ["a", "Tom has 12 apples and " * 12, "The cat sat", "one two three four five six seven"]
    cfgs = [lopa.DecodeConfig(strategy=s, k=k, gen_length=24, block_size=8)
            for s, k in (("lopa", 7), ("d2f", 0), ("lopa", 3), ("threshold", 0))]
    ref = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False,
                                                                   max_num_seqs=4))
    want = [r.token_ids for r in lopa.generate_many(ref, prompts, cfgs)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [r.token_ids for r in lopa.generate_many(model, prompts, cfgs)]
    assert got == want
    c = model.engine.counters
    assert c.captures_after_start == 0 and c.recompiles_after_start == 0 and c.eager_decode_steps == 0
