"""The static decode path behind CUDA graphs: its batched predict and its mask equal the eager ones."""

import dataclasses

import pytest
import torch

import lopa
from lopa.engine import Engine
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
