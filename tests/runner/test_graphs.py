"""The static-shape decode path behind CUDA graphs, run without capture on the CPU: same tokens and counts
as the eager runner (padding columns and unused cache slots are masked out exactly)."""

import pytest
import torch

import lopa
from lopa.decoding import make_strategy
from lopa.decoding.confidence import predict
from lopa.models.attention import branch_mask, padded_branch_mask
from lopa.runner.graphs import GraphRunner, round_up
from lopa.runner.single import Runner


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("strategy,extra", [("d2f", {}), ("lopa", {"k": 3}), ("threshold", {}),
                                            ("lopa", {"k": 2, "base": "threshold", "attention": "block_causal"})])
def test_static_path_matches_eager(family, strategy, extra, request):
    model = lopa.load_model(request.getfixturevalue(f"tiny_{family}_dir"), runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    cfg = lopa.DecodeConfig(strategy=strategy, gen_length=40, block_size=8, tau=0.5, trace=True, **extra)
    prompt = model.tokenizer.encode("Tom has 12 apples and")
    eager = Runner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32)
    static = GraphRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, capture=False)
    a = eager.run(make_strategy(cfg, loaded.spec), prompt)
    b = static.run(make_strategy(cfg, loaded.spec), prompt)
    assert a.token_ids == b.token_ids
    assert a.stats.decode_forwards == b.stats.decode_forwards
    assert [s.winner for s in a.trace] == [s.winner for s in b.trace]
    assert static.statics, "the static path was not exercised"
    # a second request reuses the cache and the static buffers
    c = static.run(make_strategy(cfg, loaded.spec), prompt)
    assert c.token_ids == a.token_ids


def test_static_path_with_fused_kernels_matches_eager(tiny_dream_dir, monkeypatch):
    """GraphRunner(fuse=True) compiles the confidence pass; the eager backend checks it traces whole."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded
    cfg = lopa.DecodeConfig(strategy="lopa", k=3, gen_length=40, block_size=8, tau=0.5, trace=True)
    prompt = model.tokenizer.encode("Tom has 12 apples and")
    a = Runner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32).run(make_strategy(cfg, loaded.spec), prompt)
    static = GraphRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, capture=False, fuse=True)
    assert static.predict is not predict
    b = static.run(make_strategy(cfg, loaded.spec), prompt)
    assert a.token_ids == b.token_ids and [s.winner for s in a.trace] == [s.winner for s in b.trace]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager_on_gpu(tiny_dream_dir):
    fast = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32"))
    slow = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False))
    for strategy in ("d2f", "lopa"):
        a = lopa.generate(slow, "Tom has 12 apples and", strategy=strategy, k=3, gen_length=40, block_size=8)
        b = lopa.generate(fast, "Tom has 12 apples and", strategy=strategy, k=3, gen_length=40, block_size=8)
        assert a.token_ids == b.token_ids


@pytest.mark.parametrize("P,K,W,Wb,blocks", [(5, 3, 10, 16, None), (0, 1, 16, 16, None),
                                             (7, 2, 12, 16, [0] * 4 + [1] * 8), (33, 4, 32, 32, [i // 8 for i in range(32)])])
def test_device_built_mask_equals_branch_mask(P, K, W, Wb, blocks):
    """The graph's mask (built from P and W as tensors) is branch_mask with padding columns hidden as keys."""
    L = round_up(P + K * Wb + 1, 64)
    ids = torch.zeros(Wb, dtype=torch.long) if blocks is None else torch.tensor(blocks + [max(blocks) + 1] * (Wb - W))
    ref = branch_mask(P, K, Wb, None if blocks is None else ids, (W,) * K)
    ref = torch.cat([ref, torch.zeros(K * Wb, L - ref.shape[1], dtype=torch.bool)], dim=1)
    assert torch.equal(padded_branch_mask(torch.tensor(P), torch.tensor(W), ids, K, Wb, L), ref)
