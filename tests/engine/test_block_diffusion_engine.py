"""SDAR and Fast-dLLM v2 decoding through the engine's other paths: the static (CUDA-graph) path run on the
CPU without capture, and Branch Parallel on 2 gloo ranks, each token for token equal to the eager single
process (float64)."""

import dataclasses

import pytest
import torch

from lopa import RunnerConfig, generate, generate_many, load_model
from lopa.engine import Engine
from lopa.runner.model_runner import ModelRunner

PROMPTS = ([5, 6, 7, 8, 9, 10, 11, 12], [9, 3, 4, 12, 2, 7, 30, 31, 40, 41, 3])
FAMILIES = ("sdar", "fast_dllm_v2")


def configs(name):
    return [dict(strategy=name, gen_length=20, tau=0.9, sub_block=4),
            dict(strategy=name, gen_length=20, tau=0.9, sub_block=4, fold_commit=False),
            dict(strategy="lopa", base=name, k=3, gen_length=20, tau=0.9, sub_block=4),
            dict(strategy="lopa", base=name, k=3, gen_length=20, tau=0.9, sub_block=4, score_span="active")]


@pytest.mark.parametrize("name,attention", [(n, a) for n in FAMILIES for a in ("sdpa", "flex")])
def test_static_path_matches_eager(name, attention, request):
    """Under "flex" the block-causal prompt prefills (and Fast-dLLM v2's prefill that predicts) run statically too."""
    model = load_model(request.getfixturevalue(f"tiny_{name}_dir"), runner=RunnerConfig(device="cpu", dtype="float64"))
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64, max_num_seqs=2, static=True,
                         capture=False, attention=attention)
    static = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 2))
    for kw in configs(name):
        ref = [generate(model, p, **kw).token_ids for p in PROMPTS]
        got = generate_many(static, list(PROMPTS), **kw)
        assert [r.token_ids for r in got] == ref, kw
    assert runner.graphs.statics, "the static path was not exercised"
    assert bool(runner.prefill_shapes) and all(q % 32 == 0 for _, q in runner.prefill_shapes) == (attention == "flex")


def test_branch_parallel_two_ranks_match_one_process(tiny_sdar_dir, tiny_fast_dllm_v2_dir):
    for name, folder in zip(FAMILIES, (tiny_sdar_dir, tiny_fast_dllm_v2_dir)):
        ref = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64"))
        bp = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64", branch_parallel=2, bp_check=True,
                                                    bp_timeout_s=60))
        try:
            for kw in configs(name)[1:]:
                for prompt in PROMPTS:
                    a, b = generate(ref, prompt, **kw), generate(bp, prompt, **kw)
                    assert b.token_ids == a.token_ids and b.stats.decode_forwards == a.stats.decode_forwards, kw
            # rows were split over the ranks; ranks agree on every committed K/V (with score_span "next_region" a
            # forward after a reused fill can branch while it commits, so a winner's K/V may travel)
            bp_counters = bp.engine.bp
            assert bp_counters.split_steps > 0 and bp_counters.checks > 0 and bp_counters.kv_max_diff == 0.0
        finally:
            bp.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", FAMILIES)
def test_graph_replay_matches_eager_on_gpu(name, request):
    """Batched CUDA-graph replay equals batched eager on the GPU in float32 (the tiny models)."""
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    fast = load_model(folder, runner=RunnerConfig(device="cuda", dtype="float32", max_num_seqs=2))
    slow = load_model(folder, runner=RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False, max_num_seqs=2))
    for kw in configs(name):
        a, b = generate_many(slow, list(PROMPTS), **kw), generate_many(fast, list(PROMPTS), **kw)
        assert [r.token_ids for r in a] == [r.token_ids for r in b], kw
    assert fast.runner.graphs.statics and all(s.graph is not None for s in fast.runner.graphs.statics.values())
