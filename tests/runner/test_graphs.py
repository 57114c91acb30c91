"""The static-shape decode path behind CUDA graphs, run without capture on the CPU: same tokens and counts
as the eager runner (padding columns and unused cache slots are masked out exactly)."""

import pytest
import torch

import lopa
from lopa.decoding import make_strategy
from lopa.runner.graphs import GraphRunner
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager_on_gpu(tiny_dream_dir):
    fast = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32"))
    slow = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False))
    for strategy in ("d2f", "lopa"):
        a = lopa.generate(slow, "Tom has 12 apples and", strategy=strategy, k=3, gen_length=40, block_size=8)
        b = lopa.generate(fast, "Tom has 12 apples and", strategy=strategy, k=3, gen_length=40, block_size=8)
        assert a.token_ids == b.token_ids
