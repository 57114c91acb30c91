"""SDAR and Fast-dLLM v2 decoding through the engine's other paths: the static (CUDA-graph) path run on the
CPU without capture, Branch Parallel on 2 gloo ranks, and the device iteration (engine/device.py with
decoding/batched_blocks.py), each token for token equal to the eager single process on the host strategies
(float64)."""

import dataclasses

import pytest
import torch

from lopa import RunnerConfig, generate, generate_many, load_model
from lopa.config import decode_config
from lopa.engine import Engine
from lopa.models.tiny import write_tiny_checkpoint
from lopa.runner.model_runner import ModelRunner

from decoding.roundtrip import assert_slot_round_trip  # tests/decoding
from engine_steps import run_steps, traced_update  # tests/engine

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


# -- the device iteration ------------------------------------------------------------------------------------------
TINY = dict(seed=5, logit_scale=0.8, special_scale=1.5)  # peaked enough to fill several masks a step
DEVICE_PROMPTS = ([7, 9, 11], list(range(5, 13)), list(range(6, 15)), list(range(20, 31)), [3, 4, 5, 6, 7, 8, 9, 10])


def device_configs(name, model):
    """The family's own loop (fixed steps: tau 1.0; dynamic threshold) and lopa k in {0, 3} with verify_lookahead
    on / off and score_span active / next_region."""
    own = [dict(strategy=name, tau=1.0), dict(strategy=name, tau=0.4)]
    lopa = [dict(strategy="lopa", base=name, k=k, verify_lookahead=verify, score_span=span, tau=(0.4, 0.9)[i % 2])
            for i, (k, verify, span) in enumerate((k, v, s) for k in (0, 3) for v in (True, False)
                                                   for s in ("active", "next_region"))]
    return [decode_config(None, model.model_type, gen_length=18, sub_block=4, block_size=model.loaded.spec.block_size,
                          **o) for o in own + lopa]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model, folder, spec): the spec's EOS ids add a token the model emits often (its second most frequent
    over the test's requests), so answers end at varied places, inside blocks."""
    name = request.param
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(f"dev_{name}"), model_type=name, **TINY)
    model = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64"))
    configs = device_configs(name, model)
    probe = _drive(_engine(model, len(configs), False), _prompts(len(configs)), configs, [0] * len(configs))
    counts = torch.bincount(torch.tensor([t for ids, *_ in probe for t in ids]))
    eos = int(counts.argsort(descending=True, stable=True)[1])
    return name, model, folder, dataclasses.replace(model.loaded.spec, eos_ids=(model.loaded.spec.eos_ids[0], eos))


def _prompts(n):
    return [DEVICE_PROMPTS[i % len(DEVICE_PROMPTS)] for i in range(n)]


def _engine(model, slots: int, device_step: bool, spec=None, static: bool = False, attention: str = "sdpa",
            max_positions: int | None = None):
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64, max_num_seqs=slots,
                         static=static, capture=False, attention=attention, max_positions=max_positions)
    engine = Engine(runner, spec or loaded.spec, slots, device_step=device_step)
    engine.winner_log = {}
    return engine


def _drive(engine, prompts, configs, joins, stream=False):
    """Requests join at the given steps -> per request (tokens, decode forwards, winners per decode step, streamed
    chunks)."""
    seqs = [engine.prepare(p, c, stream=stream) for p, c in zip(prompts, configs)]
    finals, chunks = run_steps(engine, seqs, joins)
    return [(out.result.token_ids, out.result.stats.decode_forwards, engine.winner_log.get(s.id), c)
            for out, s, c in zip(finals, seqs, chunks)]


def test_device_path_equals_the_host_strategies(tiny):
    """Every request at once, staggered joins on the static path (both attentions), fewer slots than requests:
    tokens, decode forwards, per-step winners and streamed chunks equal the host path's; every decode step ran on
    the device."""
    name, model, _, spec = tiny
    configs = device_configs(name, model)
    n = len(configs)
    prompts = _prompts(n)
    want = _drive(_engine(model, n, False, spec), prompts, configs, [0] * n, stream=True)
    size, eos = spec.block_size, spec.eos_ids
    ends = [len(p) + len(t) - 1 for p, (t, *_) in zip(prompts, want) if t and t[-1] in eos]
    assert any(e % size != size - 1 for e in ends) and len({len(t) for t, *_ in want}) > 3  # EOS inside blocks
    assert any(max(w, default=0) > 0 for _, _, w, _ in want[2:])  # lookahead winners
    assert any(any(c[:-1]) for *_, c in want)  # chunks streamed before the end
    for slots, joins, static, attention in ((n, [0] * n, False, "sdpa"), (n, [i // 2 for i in range(n)], True, "sdpa"),
                                            (n, [i // 3 for i in range(n)], True, "flex"), (3, [0] * n, False, "sdpa")):
        engine = _engine(model, slots, True, spec, static=static, attention=attention)
        assert all(s.device_ok for s in [engine.prepare(p, c) for p, c in zip(prompts, configs)])
        assert _drive(engine, prompts, configs, joins, stream=True) == want, (slots, static, attention)
        c = engine.counters
        assert c.device_steps == c.decode_steps > 0


@pytest.mark.filterwarnings("error:the device path's update did not compile")  # no silent fallback to eager
def test_the_compiled_update_equals_the_host_strategies(tiny, monkeypatch):
    """The device path's compiled update (engine/device.py: compiled_update, what a GPU runs; here traced by dynamo
    and run as traced) over the block-diffusion rules (decoding/batched_blocks.py inside accept and propose): each
    phase traces whole (at most twice over the warm-up: one request apart), and tokens, forwards and winners equal
    the host path's, every step replaying a warmed key."""
    name, model, _, spec = tiny
    configs = device_configs(name, model)
    n = len(configs)
    want = _drive(_engine(model, 4, False, spec), _prompts(n), configs, [i // 2 for i in range(n)])
    engine = _engine(model, 4, True, spec, static=True, attention="flex", max_positions=512)
    with traced_update(monkeypatch) as (engine.device.update, counts, _):
        engine.runner.warmup(512)
        engine.device.warmup([key[:2] for key in engine.runner.graphs.warmup_keys(512)])
        assert _drive(engine, _prompts(n), configs, [i // 2 for i in range(n)]) == want
    c = engine.counters
    assert 4 <= sum(counts.values()) <= 8 and c.device_steps == c.decode_steps > 0 and c.eager_decode_steps == 0


def test_after_the_warm_up_block_diffusion_steps_replay_warmed_keys(tiny):
    """A block-diffusion model's step key holds its span (Wm + 2 * block size, fixed by the query bucket), so the
    device path's warm-up (here each key run once on the CPU, "flex") covers its steps: a staggered run of the
    matrix (default measure and score) takes no eager step and no new key, and equals the host path."""
    name, model, _, spec = tiny
    configs = device_configs(name, model)
    n, joins = len(configs), [i // 2 for i in range(len(configs))]
    want = _drive(_engine(model, 4, False, spec), _prompts(n), configs, joins)
    engine = _engine(model, 4, True, spec, static=True, attention="flex", max_positions=512)
    engine.runner.warmup(512)
    assert engine.device.warmup([key[:2] for key in engine.runner.graphs.warmup_keys(512)]) > 0
    keys = set(engine.device.graphs)
    assert _drive(engine, _prompts(n), configs, joins) == want
    c = engine.counters
    assert c.device_steps == c.decode_steps > 0 and c.eager_decode_steps == 0 and set(engine.device.graphs) == keys


def test_host_only_requests_between_device_steps(tiny):
    """A request the device path does not take (trace) joins mid-way: the block-diffusion requests go back to their
    host states for its steps and return after, and every request still equals the host path."""
    name, model, _, spec = tiny
    configs = device_configs(name, model)[1::2]
    configs.append(configs[-1].replace(trace=True))
    prompts = _prompts(len(configs))
    joins = [0] * (len(configs) - 1) + [3]
    want = _drive(_engine(model, len(configs), False, spec), prompts, configs, joins)
    engine = _engine(model, len(configs), True, spec)
    assert _drive(engine, prompts, configs, joins) == want
    assert 0 < engine.counters.device_steps < engine.counters.decode_steps  # both paths ran


def test_load_then_store_restores_a_block_diffusion_state(tiny):
    """Slots.load / store of a request after each of its host steps (its blocks, pending batch with lookahead rows
    and the next-region score set) lose nothing."""
    name, model, _, spec = tiny
    branched = 0
    for cfg in device_configs(name, model)[1::3]:
        engine = _engine(model, 1, False, spec)
        seq = engine.prepare(DEVICE_PROMPTS[3], cfg)
        engine.add(seq)
        with torch.inference_mode():
            while engine.has_work():
                engine.step()
                if seq.batch is None or seq.batch.prefill:
                    continue
                branched += seq.batch.tokens.shape[0] > 1
                assert seq.batch.block_ids is not None  # block-causal windows
                assert_slot_round_trip(seq.strategy, seq.state, seq.batch, len(seq.state.canvas) + 3, 4)
    assert branched


def test_fold_commit_off_stays_on_the_host(tiny):
    """SDAR's extra forward per finished block (fold_commit=False) is host-only; Fast-dLLM v2 has none."""
    name, model, _, _ = tiny
    engine = _engine(model, 1, True)
    cfg = device_configs(name, model)[0].replace(fold_commit=False)
    assert engine.prepare([5, 6, 7], cfg).device_ok == (name == "fast_dllm_v2")
    assert not engine.prepare([5, 6, 7], device_configs(name, model)[0].replace(trace=True)).device_ok


def test_device_path_over_two_ranks_equals_one_process(tiny):
    """Branch Parallel (2 gloo ranks) on the device path: every rank runs the same block-diffusion update."""
    name, model, folder, _ = tiny  # the model's own EOS: the workers load the folder
    configs = [c for c in device_configs(name, model) if c.k == 3][::3]
    prompts = list(DEVICE_PROMPTS[:len(configs)])
    want = _drive(_engine(model, len(configs), False), prompts, configs, [0] * len(configs))
    bp = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64", branch_parallel=2, bp_check=True,
                                                      bp_timeout_s=60, device_step=True, max_num_seqs=len(configs)))
    try:
        got = generate_many(bp, prompts, configs)
        assert [(r.token_ids, r.stats.decode_forwards) for r in got] == [tuple(w[:2]) for w in want]
        c = bp.engine.counters
        assert c.device_steps == c.decode_steps > 0 and bp.engine.bp.checks > 0 and bp.engine.bp.kv_max_diff == 0.0
    finally:
        bp.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", FAMILIES)
def test_device_path_equals_the_host_path_on_gpu(name, request):
    """On a GPU the block-diffusion device step is captured per key and replayed (lazily: eager, capture, replay);
    float32: the same tokens and decode forwards as the host strategies."""
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    runner = dict(device="cuda", dtype="float32", max_num_seqs=2)
    host = load_model(folder, runner=RunnerConfig(**runner, device_step=False))
    dev = load_model(folder, runner=RunnerConfig(**runner, device_step=True))
    for kw in configs(name)[::2]:  # the own loop (folded commit) and lopa k=3 with score_span "next_region"
        for _ in range(3):
            a, b = generate_many(host, list(PROMPTS), **kw), generate_many(dev, list(PROMPTS), **kw)
            assert [(r.token_ids, r.stats.decode_forwards) for r in a] == \
                [(r.token_ids, r.stats.decode_forwards) for r in b], kw
    assert any(graph is not None for graph, _ in dev.engine.device.graphs.values())
    assert dev.engine.counters.device_steps == dev.engine.counters.decode_steps > 0
