"""The key property of the batch engine: a request decoded among others gives exactly the tokens, forward
count and per-step winners it gives alone, whatever else runs beside it, when it joins, or how many run at
once; eager and on the static (CUDA-graph) path run without capture; float64 and float32."""

import collections
import dataclasses
import time

import pytest
import torch

import lopa
from lopa.engine import Engine
from lopa.runner import graphs
from lopa.runner.model_runner import ModelRunner

from engine_steps import run_steps  # tests/engine

COMMON = dict(gen_length=24, block_size=8, tau=0.5, trace=True)
MIX = [  # (prompt, overrides): every strategy, different k, windows, prompt lengths and gen lengths
    ("Tom has 12 apples and", dict(strategy="lopa", k=3)),
    ("The cat sat", dict(strategy="lopa", k=2, base="threshold", attention="block_causal", gen_length=16)),
    ("one two three four five six", dict(strategy="d2f")),
    ("Mia has", dict(strategy="threshold", gen_length=32)),
    ("A B C", dict(strategy="dream", steps=10, gen_length=16)),
    ("x y z", dict(strategy="lopa", k=2, temperature=0.8, seed=3)),  # sampled, seeded
    ("Question: what is", dict(strategy="lopa", k=3, compat="published", confidence="neg_entropy")),  # Dream only
]


def _engine(model, max_num_seqs: int, static: bool, attention: str | None = None):
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), loaded.model.embed.weight.dtype,
                         max_num_seqs=max_num_seqs, static=static, capture=False, attention=attention)
    return dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, max_num_seqs))


def _configs(model):
    mix = [(p, o) for p, o in MIX if model.model_type == "dream" or "compat" not in o]
    return [p for p, _ in mix], [lopa.decode_config(None, model.model_type, **{**COMMON, **o}) for _, o in mix]


def _key(result):
    return result.token_ids, result.stats.decode_forwards, result.stats.generated_tokens, [s.winner for s in result.trace]


def _staggered(model, prompts, configs, joins):
    """Requests join at the given engine steps; returns the results in request order."""
    seqs = [model.engine.prepare(model.tokenizer.encode(p), c) for p, c in zip(prompts, configs)]
    return [out.result for out in run_steps(model.engine, seqs, joins)[0]]


@pytest.fixture(scope="module", params=["dream", "llada"])
def family(request):
    return request.param


@pytest.fixture(scope="module", params=["float64", "float32"])
def solo(family, request, tmp_path_factory):
    """The model in that dtype and every request of the mix decoded alone (the reference)."""
    from lopa.models.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(family), model_type=family, seed=0 if family == "dream" else 1)
    model = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype=request.param))
    prompts, configs = _configs(model)
    return model, prompts, configs, [_key(lopa.generate(model, p, c)) for p, c in zip(prompts, configs)]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_batched_requests_equal_their_solo_decodes(solo, static):
    model, prompts, configs, ref = solo
    n = len(prompts)
    together = _engine(model, n, static)
    assert [_key(r) for r in lopa.generate_many(together, prompts, configs)] == ref  # (a) all at once
    steps = together.engine.counters
    assert steps.decode_steps < sum(r[1] for r in ref)  # the forwards really were shared
    assert steps.requests_per_step > 1
    staggered = _engine(model, n, static)
    assert [_key(r) for r in _staggered(staggered, prompts, configs, [0, 1, 3, 5, 5, 6, 9][:n])] == ref  # (b)
    queued = _engine(model, 2, static)
    assert [_key(r) for r in lopa.generate_many(queued, prompts, configs)] == ref  # (c) some wait for a slot
    assert queued.runner.peak_slots == 2 and queued.runner.pool is None  # idle: the pool was given back


def test_step_log_accounts_for_every_forward(solo):
    """Engine.step_log: one StepInfo per step, naming the requests it computed and the positions (K*W) it ran, and
    the most of one request."""
    model, prompts, configs, _ = solo
    m = _engine(model, len(prompts), False)
    engine = m.engine
    seqs = [engine.prepare(m.tokenizer.encode(p), c) for p, c in zip(prompts, configs)]
    engine.step_log = log = []
    with torch.inference_mode():
        outs = engine.generate(seqs)
    decode = [s for s in log if s.kind == "decode"]
    assert len(log) == engine.counters.steps and len(decode) == engine.counters.decode_steps
    assert sum(s.rows for s in decode) == engine.counters.rows
    for seq, out in zip(seqs, outs):
        mine = [s for s in log if seq.id in s.request_ids]
        assert sum(s.kind == "decode" for s in mine) == out.stats.decode_forwards
        assert sum(s.kind == "prefill" for s in mine) == out.stats.prefill_forwards
    assert all(s.rows <= s.positions and len(s.request_ids) == s.requests for s in log)
    assert all(0 < s.queries <= s.positions for s in log)  # the widest request's K*W
    assert max(s.positions for s in decode) > max(s.rows for s in decode)  # windows wider than one column


@pytest.mark.parametrize("device_step", [False, True], ids=["host", "device"])
def test_a_step_counts_its_whole_wall_time(solo, device_step, monkeypatch):
    """StepInfo.seconds and the counters' prefill_s / decode_s are a step's whole wall time: its scheduling, the
    slot moves before its forward and the finished requests' outputs after it count, on both paths (each made to
    take 10 ms here; the rest of the step only adds)."""
    model, prompts, configs, _ = solo
    m = _engine(model, 2, False)  # fewer slots than requests: requests leave, others join and slots move
    engine = Engine(m.runner, m.loaded.spec, 2, device_step=device_step)
    slow = {}

    def slowed(owner, name):
        fn = getattr(owner, name)

        def call(*args, **kwargs):
            slow[name] = slow.get(name, 0) + 1
            time.sleep(0.01)
            return fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, call)

    for owner, name in ((engine.scheduler, "schedule"), (engine.runner, "move"), (engine, "_finish")):
        slowed(owner, name)
    keep = [i for i, c in enumerate(configs) if c.strategy in ("lopa", "d2f", "threshold") and c.temperature == 0]
    seqs = [engine.prepare(m.tokenizer.encode(prompts[i]), configs[i].replace(trace=False)) for i in keep]
    engine.step_log = log = []
    with torch.inference_mode():
        outs = engine.generate(seqs)
    assert len(outs) == len(seqs) and slow["move"] == len(log) and slow["_finish"] == len(seqs)
    assert (engine.counters.device_steps > 0) == device_step
    last = {rid: i for i, s in enumerate(log) for rid in s.request_ids}  # each request's finishing step
    finishing = [log[i] for i in sorted(set(last.values()))]
    assert finishing and all(s.seconds >= 0.02 for s in log)  # its schedule and its moves
    assert all(s.seconds >= 0.03 for s in finishing)  # and the outputs of the requests it finished
    c = engine.counters
    assert c.decode_s == pytest.approx(sum(s.seconds for s in log if s.kind == "decode"))
    assert c.prefill_s == pytest.approx(sum(s.seconds for s in log if s.kind == "prefill"))


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_static_path_was_taken_with_padded_buckets(solo, attention):
    """Under "flex" the prefill steps take the static path too (the prompts padded to a query bucket)."""
    model, prompts, configs, ref = solo
    greedy = [i for i, c in enumerate(configs) if c.temperature == 0 and c.strategy != "dream"]
    greedy = (greedy * 2)[:5]  # 5 requests run in a bucket of 6: one padding row over a free slot
    m = _engine(model, 6, static=True, attention=attention)
    m.runner.reserve(6, 512)
    m.runner.pool.kv.uniform_(-50, 50)  # stale garbage everywhere: no real query may read any of it
    got = lopa.generate_many(m, [prompts[i] for i in greedy], [configs[i] for i in greedy])
    assert [_key(r) for r in got] == [ref[i] for i in greedy]
    keys = list(m.runner.graphs.statics)
    assert any(k[0] == 6 for k in keys), keys
    assert m.runner.hidden.isfinite().all()  # padding rows (and padding queries) stay finite
    prefill_queries = {q for _, q in m.runner.prefill_shapes}
    assert prefill_queries <= set(graphs.QUERY_BUCKETS) if attention == "flex" else not prefill_queries & {32, 64}


def test_abort_leaves_the_others_identical(solo):
    model, prompts, configs, ref = solo
    m = _engine(model, len(prompts), static=False)
    engine = m.engine
    seqs = [engine.prepare(model.tokenizer.encode(p), c) for p, c in zip(prompts, configs)]
    for s in seqs:
        engine.add(s)
    results, aborted, step = {}, None, 0
    with torch.inference_mode():
        while engine.has_work():
            if step == 3:
                engine.abort(seqs[0].id)
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
            step += 1
    assert results[seqs[0].id].finish_reason == "abort" and results[seqs[0].id].result is None
    assert [_key(results[s.id].result) for s in seqs[1:]] == ref[1:]
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_streamed_blocks_concatenate_to_the_final_output(solo):
    model, prompts, configs, ref = solo
    m = _engine(model, len(prompts), static=False)
    engine = m.engine
    seqs = [engine.prepare(model.tokenizer.encode(p), c, stream=True) for p, c in zip(prompts, configs)]
    for s in seqs:
        engine.add(s)
    streamed = {s.id: [] for s in seqs}
    final = {}
    with torch.inference_mode():
        while engine.has_work():
            for out in engine.step():
                if not out.finished:
                    size = next(s.config.block_size for s in seqs if s.id == out.request_id)
                    assert len(out.new_ids) % size == 0 and out.new_ids  # whole blocks only, until the end
                streamed[out.request_id] += out.new_ids
                if out.finished:
                    final[out.request_id] = out
    for s, r in zip(seqs, ref):
        assert streamed[s.id] == final[s.id].result.token_ids == r[0]
        assert final[s.id].finish_reason in ("stop", "length")


def test_a_failing_strategy_ends_only_its_own_request(solo):
    model, prompts, configs, ref = solo
    m = _engine(model, len(prompts), static=False)
    engine = m.engine
    seqs = [engine.prepare(model.tokenizer.encode(p), c) for p, c in zip(prompts, configs)]
    accept, calls = seqs[1].strategy.accept, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom")
        return accept(*args)

    seqs[1].strategy.accept = flaky
    for s in seqs:
        engine.add(s)
    outs = {}
    with torch.inference_mode():
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out
    assert outs[seqs[1].id].finish_reason == "error" and isinstance(outs[seqs[1].id].error, ValueError)
    assert [_key(outs[s.id].result) for i, s in enumerate(seqs) if i != 1] == ref[:1] + ref[2:]
    with pytest.raises(ValueError, match="boom"):  # the library loop re-raises it, and leaves the engine empty
        calls.clear()
        seq = engine.prepare(model.tokenizer.encode(prompts[1]), configs[1])
        seq.strategy.accept = flaky
        with torch.inference_mode():
            engine.generate([seq, engine.prepare(model.tokenizer.encode(prompts[0]), configs[0])])
    assert not engine.has_work() and engine.num_running == 0
    assert _key(lopa.generate(m, prompts[0], configs[0])) == ref[0]


def test_load_budget_gives_each_request_fewer_branches_when_more_share_a_step(tiny_dream_dir):
    prompts = ["Tom has 12 apples and", "The cat sat", "one two three", "Mia has"]
    cfg = lopa.DecodeConfig(strategy="lopa", k=6, gen_length=16, block_size=8, tau=0.5, k_policy="load")

    def rows_per_forward(max_num_seqs, step_rows):
        model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", max_num_seqs=max_num_seqs,
                                                                         step_rows=step_rows))
        stats = [r.stats for r in lopa.generate_many(model, prompts, cfg)]
        return sum(s.branch_rows for s in stats) / sum(s.decode_forwards for s in stats), model.engine.counters

    alone, _ = rows_per_forward(1, 4 * 16)  # one request at a time: its window's 16 columns fit 4 rows
    shared, counters = rows_per_forward(4, 4 * 16)  # four share the same rows: one lookahead each (the floor)
    unlimited, _ = rows_per_forward(4, 10**6)  # a budget that never binds: each takes its k
    assert shared <= 2.0 < alone <= 4.0 < unlimited  # (forwards without candidates have one row)
    assert counters.rows_per_step <= counters.requests_per_step * 2
    with pytest.raises(lopa.ConfigError, match="step_rows"):  # no budget at all: refused, never run as "fixed"
        rows_per_forward(4, None)
    with pytest.raises(lopa.ConfigError, match="step_rows"):
        lopa.RunnerConfig(step_rows=0)


def _warmed_flex(model, budget: bool):
    """``model`` on a 4-slot static "flex" runner warmed up as load_model does on a GPU (here each key's body runs
    once instead of a capture) for steps of at most 192 padded queries; without ``budget`` every decode step runs
    every running request (the engine before the step budget)."""
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), loaded.model.embed.weight.dtype,
                         max_num_seqs=4, max_positions=512, static=True, capture=False, attention="flex")
    runner.warmup(max_tokens=192)
    m = dataclasses.replace(model, runner=runner, engine=Engine(runner, loaded.spec, 4))
    if not budget:
        m.engine.scheduler.take = None
    return m


@pytest.mark.diagonal
def test_step_budget_keeps_every_decode_step_on_a_warmed_shape(solo):
    """Issue 25's step budget on the host static path ("flex", warmed up as load_model does on a GPU; here the
    bodies run once instead of a capture): four requests at once, whose decode steps together pass the warmed
    keys (B bucket x Qb <= 192: e.g. 4 requests need Qb <= 32) while each alone fits. Without the budget most
    decode steps run eagerly; with it every one has a warmed key (the scheduler runs the first requests that fit
    and rotates the rest in), and each request's tokens, forwards and winners equal its solo decode."""
    model, prompts, configs, ref = solo
    pick = [i for i, c in enumerate(configs) if c.strategy in ("lopa", "d2f", "threshold") and c.temperature == 0
            and c.compat is None]
    assert len(pick) == 4
    counters = []
    for budget in (False, True):
        m = _warmed_flex(model, budget)
        keys = set(m.runner.graphs.statics)
        seqs = [m.engine.prepare(m.tokenizer.encode(prompts[i]), configs[i]) for i in pick]
        calls = collections.Counter()
        with torch.inference_mode():  # as the API runs it
            got = m.engine.generate(seqs, on_step=lambda s: calls.update([s.id]))
        assert [_key(r) for r in got] == [ref[i] for i in pick]
        assert set(m.runner.graphs.statics) == keys
        # on_step: once per decode forward a request took part in (a partial step's deferred requests took none)
        assert [calls[s.id] for s in seqs] == [r.stats.decode_forwards for r in got]
        counters.append(m.engine.counters)
    before, after = counters
    assert before.eager_decode_steps > 0 and before.partial_steps == 0
    assert after.eager_decode_steps == 0 and after.partial_steps > 0 and after.deferred_requests >= after.partial_steps
    assert after.as_dict()["partial_steps"] == after.partial_steps and after.captures_after_start == 0


@pytest.mark.parametrize("change", [dict(temperature=0.8), dict(confidence="margin")], ids=["sampled", "measure"])
def test_step_budget_leaves_a_step_no_graph_serves_whole(solo, change):
    """A step holding a request the warm-up captured no graph for (sampled: no captured shape predicts it; a
    measure other than the default) runs eagerly whatever its size, so the budget does not split it: with every
    request of that kind, no partial step, and the tokens of the unbudgeted schedule."""
    model, prompts, configs, _ = solo
    pick = [i for i, c in enumerate(configs) if c.strategy in ("lopa", "d2f") and c.compat is None][:4]
    changed = [dataclasses.replace(configs[i], **change, seed=7 + i) for i in pick]
    runs = []
    for budget in (False, True):
        m = _warmed_flex(model, budget)
        runs.append(([r.token_ids for r in lopa.generate_many(m, [prompts[i] for i in pick], changed)],
                     m.engine.counters.partial_steps))
    assert runs[1] == (runs[0][0], 0)


def test_a_step_runs_without_autograd_whoever_calls_it(tiny_dream_dir):
    """Engine.step enters inference mode itself: a script driving the engine outside it builds no autograd graph
    (the predictions it keeps do not require grad) and gets the tokens generate gives."""
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    cfg = lopa.DecodeConfig(strategy="lopa", k=3, gen_length=16, block_size=8, tau=0.5)
    engine = model.engine
    seq = engine.prepare(model.tokenizer.encode("Tom has 12 apples and"), cfg)
    engine.add(seq)
    done = []
    while engine.has_work():
        done += [out.result for out in engine.step() if out.finished]
        assert not seq.state.pred_conf.requires_grad and not torch.is_inference_mode_enabled()
    assert done[0].token_ids == lopa.generate(model, "Tom has 12 apples and", cfg).token_ids
