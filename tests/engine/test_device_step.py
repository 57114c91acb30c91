"""The device path (engine/device.py) is an accelerated WindowStrategy: every request it decodes gives the host
strategies' tokens, decode-forward count and per-step winners, for every branch score, both bases, both window
attentions, threshold / d2f / lopa, k in {0, 1, 3, 7} and every k_policy; all at once, staggered, queued,
aborted, mixed with requests it does not take (their states go back to the host and return), with EOS inside
the window; float64 and float32, both model families."""

import copy
import dataclasses

import pytest
import torch

import lopa
import lopa.api
from lopa.config import COMPILE_UPDATE_MAX_PARAMS, DEVICE_STEP_MIN_UNFUSED, compiles_update, device_step_min_of
from lopa.decoding import batched
from lopa.decoding.slots import I, Slots
from lopa.engine import Engine
from lopa.engine.device import flat_counts
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import unpack

from decoding.roundtrip import assert_slot_round_trip, assert_slots_round_trip  # tests/decoding
from engine_steps import run_steps, traced_update  # tests/engine

SCORES = ("mean", "lowest", "count", "top_m", "segment", "logsum")
MEASURES = {"count": "prob", "logsum": "margin", "segment": "neg_entropy", "top_m": "margin", "lowest": "prob",
            "mean": "neg_entropy"}
BASE = [
    dict(strategy="threshold"),
    dict(strategy="threshold", attention="block_causal", tau=0.2, gen_length=20),
    dict(strategy="d2f"),
    dict(strategy="d2f", attention="full", tau=0.2, add_threshold=0.5, complete_threshold=0.5, block_size=4),
    dict(strategy="lopa", k=0),
    dict(strategy="lopa", k=0, base="threshold", confidence="margin"),
]
LOPA = [dict(strategy="lopa", k=(1, 3, 7)[i % 3], base=("d2f", "threshold")[i % 2], branch_confidence=score,
             attention=("full", "block_causal")[i // 2 % 2], tau=(0.5, 0.15)[i // 6], branch_m=(3, 8)[i % 2],
             confidence=MEASURES[score] if i < 6 else "prob", gen_length=(24, 20)[i // 6],
             block_size=(8, 6)[i // 6]) for i, score in enumerate(SCORES * 2)]
POLICIES = [dict(strategy="lopa", k=7, k_policy="text", tau=0.3), dict(strategy="lopa", k=7, k_policy="load"),
            dict(strategy="lopa", k=3, k_policy="load", base="threshold", gen_length=24)]
MATRIX = BASE + LOPA
STEP_ROWS = 160  # RunnerConfig.step_rows: k_policy "load" shares it among the step's requests
PROMPTS = ["Tom has 12 apples and", "The cat sat", "one two three four five six", "Mia has", "A B C", "x y z w",
           "Question: what is"]


@pytest.fixture(scope="module", params=["dream", "llada"])
def family(request):
    return request.param


@pytest.fixture(scope="module", params=["float64", "float32"])
def ref(family, request, tmp_path_factory):
    """The model, an EOS id the tiny model really emits (so answers end inside windows), and every request of
    the matrix decoded by the host strategies (trace: the winners)."""
    from lopa.models.tiny import write_tiny_checkpoint

    seed = 0 if family == "dream" else 1
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(family), model_type=family, seed=seed)
    model = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu", dtype=request.param))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(MATRIX))]
    configs = [lopa.decode_config(None, model.model_type, **{**dict(gen_length=16, block_size=8, tau=0.5), **o})
               for o in MATRIX]
    probe = lopa.generate_many(_engine(model, len(MATRIX), device_step=False), prompts, configs)
    counts = torch.bincount(torch.tensor([t for r in probe for t in r.token_ids]))
    spec = dataclasses.replace(model.loaded.spec, eos_ids=(model.loaded.spec.eos_ids[0], int(counts.argmax())))
    host = _engine(model, len(MATRIX), device_step=False, spec=spec)
    results = lopa.generate_many(host, prompts, [c.replace(trace=True) for c in configs])
    assert sum(len(r.token_ids) < c.gen_length for r, c in zip(results, configs)) >= len(MATRIX) // 3  # EOS stops
    assert all(host.engine.winner_log[f"req-{i}"] == [s.winner for s in r.trace] for i, r in enumerate(results))
    return model, spec, prompts, configs, [_key(r, [s.winner for s in r.trace]) for r in results], host


def _engine(model, max_num_seqs: int, device_step: bool = True, static: bool = False, spec=None,
            attention: str = "sdpa", max_positions: int | None = None, device_min: int = 1,
            key_splits: int | None = None):
    """static: the static path's bucketed shapes without capture; attention "flex": eager FlexAttention over the
    whole slot (keys without lengths; key_splits: in that many chunks), "sdpa": an additive mask over the bucketed
    span."""
    loaded = model.loaded
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), loaded.model.embed.weight.dtype,
                         max_num_seqs=max_num_seqs, static=static, capture=False, attention=attention,
                         max_positions=max_positions, key_splits=key_splits)
    engine = Engine(runner, spec or loaded.spec, max_num_seqs, STEP_ROWS, device_step=device_step,
                    device_step_min=device_min)
    engine.winner_log = {}
    return dataclasses.replace(model, runner=runner, engine=engine)


def _key(result, winners):
    return result.token_ids, result.stats.decode_forwards, result.stats.generated_tokens, winners


def _drive(m, prompts, configs, joins, aborts=(), stream=False):
    """Requests join at the given steps (aborts: (request index, step)); results by request index."""
    seqs = [m.engine.prepare(m.tokenizer.encode(p), c, stream=stream) for p, c in zip(prompts, configs)]
    finals, chunks = run_steps(m.engine, seqs, joins, aborts)
    keys = [_key(out.result, m.engine.winner_log.get(s.id)) if out.result else None for out, s in zip(finals, seqs)]
    return keys, dict(enumerate(chunks))


def test_every_request_equals_the_host_strategies(ref):
    model, spec, prompts, configs, want, host = ref
    n = len(configs)
    together = _engine(model, n, spec=spec)
    assert all(s.device_ok for s in [together.engine.prepare([5, 6], c) for c in configs])
    assert _drive(together, prompts, configs, [0] * n)[0] == want  # all at once
    c, h = together.engine.counters, host.engine.counters
    assert c.device_steps == c.decode_steps > 0 and (c.decode_steps, c.rows, c.requests) == (h.decode_steps, h.rows,
                                                                                            h.requests)
    for attention, splits in (("sdpa", None), ("flex", None), ("flex", 3)):  # the static path's bucketed shapes
        staggered = _engine(model, n, spec=spec, static=True, attention=attention, key_splits=splits)
        assert _drive(staggered, prompts, configs, [i // 3 * 2 for i in range(n)])[0] == want, (attention, splits)
    queued = _engine(model, 3, spec=spec)  # fewer slots than requests: compaction moves slot rows
    assert _drive(queued, prompts, configs, [0] * n)[0] == want


def test_k_policies_equal_the_host_path(ref):
    """k_policy text and load (the load budget depends on how many requests share the step, so each schedule
    is compared with the host path under the same schedule), beside fixed-k requests."""
    model, spec, prompts, _, _, _ = ref
    configs = [lopa.decode_config(None, model.model_type, **{**dict(gen_length=16, block_size=8, tau=0.5), **o})
               for o in POLICIES + LOPA[:3]]
    prompts = prompts[:len(configs)]
    n = len(configs)
    staggered = [0, 0, 1, 1, 3, 4]
    for slots, joins, static, attention in ((n, [0] * n, False, "sdpa"), (2, [0] * n, False, "sdpa"),
                                            (n, staggered, True, "sdpa"), (n, staggered, True, "flex")):
        host = _drive(_engine(model, slots, device_step=False, spec=spec, static=static, attention=attention),
                      prompts, configs, joins)
        m = _engine(model, slots, spec=spec, static=static, attention=attention)
        assert _drive(m, prompts, configs, joins) == host and m.engine.counters.device_steps > 0


def test_lookahead_winners_commit_the_same_kv_as_the_host_path(ref):
    """The device path's KV commit (a gather-scatter over a column bound: Qb / 2, as a lookahead row wins only
    with K >= 2 rows) against the host path's, stepping side by side: k = 1, a low τ that completes a 16-column
    block per step, so lookahead winners commit 16 columns of their window. After every step each slot's
    committed K/V are equal bit for bit; the tokens alone barely feel a stale column (row 0's K/V sit there
    already, differing only through the lookahead token), so a bound below a winner's commit shows here."""
    model = ref[0]  # its own EOS: the answers run to gen_length
    cfg = lopa.decode_config(None, model.model_type, strategy="lopa", k=1, base="threshold", block_size=16,
                             gen_length=64, tau=0.02, branch_confidence="mean")
    host, dev = (_engine(model, len(PROMPTS), device_step=d, static=True).engine for d in (False, True))
    for engine in (host, dev):
        for p in PROMPTS:
            engine.add(engine.prepare(model.tokenizer.encode(p), cfg))
    finished, compared = 0, 0
    with torch.inference_mode():
        while finished < len(PROMPTS):
            outs = [engine.step() for engine in (host, dev)]
            assert [(o.request_id, o.new_ids, o.finished) for o in outs[0]] == \
                [(o.request_id, o.new_ids, o.finished) for o in outs[1]]
            finished += sum(o.finished for o in outs[0])
            if finished < len(PROMPTS):
                a, b = host.runner.pool, dev.runner.pool
                assert a.lengths == b.lengths
                for slot, length in enumerate(a.lengths):
                    assert torch.equal(a.kv[:, :, slot, :, :length], b.kv[:, :, slot, :, :length])
                compared += 1
    assert dev.counters.device_steps > 0 and compared >= 4  # the prefill and three of the four blocks' steps
    assert host.winner_log == dev.winner_log and any(w > 0 for ws in host.winner_log.values() for w in ws)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_bucket_padding_rows_are_inert(ref, attention):
    """The static path runs the update over the whole bucket (5 requests in a bucket of 6): the padding rows
    hold garbage (as slots left by finished or moved requests do) and must change nothing real."""
    model, spec, prompts, configs, want, _ = ref
    pick = [0, 4, 9, 12, 15]
    m = _engine(model, 6, spec=spec, static=True, attention=attention)
    m.runner.reserve(6, 512)
    m.runner.pool.kv.uniform_(-50, 50)
    m.engine.device._reserve(6, 64, 8)
    slots = m.engine.device.slots
    g = torch.Generator().manual_seed(0)
    for t in (slots.canvas, slots.pred_tok, slots.look, slots.ints):
        t.copy_(torch.randint(-3, 60, t.shape, generator=g))
    for t in (slots.pred_prob, slots.pred_conf, slots.floats):
        t.uniform_(-1, 2)
    for t in (slots.pred_ok, slots.scored, slots.active):
        t.copy_(torch.rand(t.shape, generator=g) > 0.5)
    got = _drive(m, [prompts[i] for i in pick], [configs[i] for i in pick], [0] * 5)[0]
    assert got == [want[i] for i in pick] and m.engine.counters.device_steps > 0


def _warmed(model, spec, max_num_seqs: int, max_tokens: int, device_step: bool = True, flat: bool = False):
    """A "flex" static path warmed up as load_model does on a GPU (here the bodies run once instead of a capture):
    the static keys, then the device path's update for the same (B, Qb) set (``flat``: RunnerConfig.flat_queries,
    every key at its flat counts too, at any size). -> (model, the device path's keys)."""
    m = _engine(model, max_num_seqs, spec=spec, static=True, attention="flex", max_positions=512,
                device_step=device_step)
    m.runner.warmup(max_tokens)
    if not device_step:
        return m, set()
    if flat:
        m.engine.device.flat_tile, m.engine.device.flat_min = 1, 0
    shapes = [key[:2] for key in m.runner.graphs.warmup_keys(max_tokens)]
    assert m.engine.device.warmup(shapes) == (3 if flat else 1) * len(shapes) > 0
    return m, set(m.engine.device.graphs)


@pytest.mark.diagonal
def test_after_the_warm_up_every_step_key_was_warmed(ref):
    """After the warm-up the device path's keys hold no length (short and long prompts, k 0 to 7, threshold,
    d2f and lopa, requests joining, queued and leaving): every step of a varied run finds its key among the warmed
    ones, so nothing new would be captured; the slots never grow; tokens, forwards and winners equal the host
    strategies'. The warm-up covers the default measure and branch score (other ones run eagerly, counted). A
    request alone past the warmed query buckets runs eagerly (SDPA over its span), counted, still exact (steps of
    several are cut to warmed shapes by the step budget: compared with the host path under the same schedule,
    which k_policy "load" reads)."""
    model, spec, prompts, _, _, _ = ref
    configs = [lopa.decode_config(None, model.model_type, **{**dict(gen_length=16, block_size=8, tau=0.5), **o})
               for o in (BASE[:5] + [dict(strategy="lopa", k=3, base="threshold", gen_length=20),
                                     dict(strategy="lopa", k=1, attention="block_causal")] + POLICIES)]
    long = "Tom has 12 apples and " * 12
    prompts = [long if i % 3 == 0 else prompts[i % len(prompts)] for i in range(len(configs))]
    joins = [0, 0, 1, 1, 3, 5, 5, 6, 6, 9]
    want = _drive(_engine(model, 4, device_step=False, spec=spec), prompts, configs, joins)[0]
    m, keys = _warmed(model, spec, 4, max_tokens=768)
    slots = m.engine.device.slots
    width = min(m.runner.pool.capacity, spec.max_length)
    assert (slots.slots, slots.width, slots.look.shape[1]) == (4, width, m.engine.max_lookahead)
    assert all(key[2] is None for key in keys)  # FlexAttention over the whole slot: no span in a key
    assert _drive(m, prompts, configs, joins)[0] == want
    c = m.engine.counters
    assert c.device_steps == c.decode_steps > 0 and c.eager_decode_steps == 0 and c.captures_after_start == 0
    assert set(m.engine.device.graphs) == keys and m.engine.device.slots is slots
    flat, flat_keys = _warmed(model, spec, 4, max_tokens=768, flat=True)  # RunnerConfig.flat_queries
    assert len(flat_keys) == 3 * len(keys) and keys < flat_keys
    forward_flat, calls = flat.runner.forward_flat, []
    flat.runner.forward_flat = lambda *args: calls.append(args[1]) or forward_flat(*args)
    assert _drive(flat, prompts, configs, joins)[0] == want and calls  # steps on the flat axis among them
    c = flat.engine.counters
    assert c.device_steps == c.decode_steps > 0 and c.eager_decode_steps == 0 and c.captures_after_start == 0
    assert c.flat_steps == len(calls) and m.engine.counters.flat_steps == 0  # counted (engine, /metrics)
    assert set(flat.engine.device.graphs) == flat_keys
    small, _ = _warmed(model, spec, 4, max_tokens=64)  # lopa k=7 rows need more queries: no key for them
    # the host path under the same schedule (the step budget's partial steps; k_policy "load" reads the load)
    host, _ = _warmed(model, spec, 4, max_tokens=64, device_step=False)
    assert _drive(small, prompts, configs, joins)[0] == _drive(host, prompts, configs, joins)[0]
    c = small.engine.counters
    assert c.device_steps == c.decode_steps and c.eager_decode_steps > 0 and c.captures_after_start == 0


@pytest.mark.diagonal
def test_wide_slots_stream_and_settle_as_the_host_path(ref):
    """Warmed slots (512 positions) far wider than a step's span (batched.Geometry: Wm or 2*Wm positions), d2f
    and lopa requests of gen_length 72 in blocks of 4 whose answers end early (the EOS tail past the span
    settles on read-back): streamed chunks, tokens, forwards and winners equal the host path's."""
    model, spec, prompts, _, _, _ = ref
    configs = [lopa.decode_config(None, model.model_type, strategy=s, k=k, gen_length=72, block_size=4, tau=0.5)
               for s, k in (("d2f", 0), ("lopa", 3))]
    args = (prompts[:2], configs, [0, 1])
    host_m = _engine(model, 4, device_step=False, spec=spec)
    host = _drive(host_m, *args, stream=True)
    assert any(len(key[0]) < 36 for key in host[0])  # an EOS well before gen_length
    m, _ = _warmed(model, spec, 4, max_tokens=256)
    assert _drive(m, *args, stream=True) == host
    c = m.engine.counters
    assert c.device_steps == c.decode_steps > 0
    canvases = {}  # what progress callbacks see (DevicePath.refresh): the tail past an EOS settled
    for name, mm in (("host", host_m), ("device", m)):
        canvases[name] = seen = []
        lopa.generate(mm, prompts[0], configs[0], on_step=lambda state: seen.append(state.canvas.tolist()))
    assert canvases["device"] == canvases["host"]


def test_start_up_warms_both_paths_and_logs_them(ref, caplog):
    """load_model's warm-up (api._warm_up, here on the CPU without capture): the static path's keys, then the device
    path's for the same (B, Qb) set, counted together, one log line; start-up ends after both."""
    from lopa import api

    model, spec, _, _, _, _ = ref
    m = _engine(model, 2, spec=spec, static=True, attention="flex", max_positions=512)
    with caplog.at_level("INFO", logger=api.log.name):
        api._warm_up(m.runner, m.engine, 64)
    stats = m.runner.graphs.stats
    static = len(m.runner.graphs.statics)
    assert static == 3 and stats.warmup_graphs == 2 * static == 2 * len(m.engine.device.graphs)
    assert len(stats.warmup_key_s) == len(stats.warmup_key_compiles) == stats.warmup_graphs  # both paths' keys timed
    assert [name.split()[0] for name in stats.warmup_key_names] == ["forward"] * static + ["update"] * static
    assert m.engine.device.warm and m.runner.graphs.frozen and m.runner.graphs.refresh_stats().captures_after_start == 0
    assert "warm-up captured 6 CUDA graphs (3 of them the device path's steps)" in caplog.text
    assert "torch.compile graphs, 0.0 s in the device path's update's" in caplog.text  # a CPU compiles nothing


def test_aborts_and_host_only_requests_between_device_steps(ref):
    """An abort leaves the others exact; a request the device path does not take (sampled, trace, dream) makes
    the running ones go back to their host states for its steps and return after, losslessly."""
    model, spec, prompts, configs, want, _ = ref
    extra = [lopa.decode_config(None, model.model_type, strategy="lopa", k=2, temperature=0.8, seed=3, gen_length=8),
             lopa.decode_config(None, model.model_type, strategy="d2f", gen_length=8, trace=True)]
    host = _drive(_engine(model, 4, device_step=False, spec=spec), prompts[:2], extra, [0, 0])[0]
    m = _engine(model, 6, spec=spec)
    n = len(configs)
    victim = max(range(n - 4), key=lambda i: want[i][1])  # the longest of those joining first: still running
    got, _ = _drive(m, prompts + prompts[:2], configs + extra, [0] * (n - 4) + [2, 2, 5, 5] + [4, 9],
                    aborts=[(victim, 3)])
    assert got[victim] is None  # aborted
    assert got[:victim] + got[victim + 1:n] == want[:victim] + want[victim + 1:]
    assert got[n:] == host
    c = m.engine.counters
    assert 0 < c.device_steps < c.decode_steps  # both paths ran


def test_too_few_running_requests_take_the_host_path(ref):
    """RunnerConfig.device_step_min: while fewer requests run, steps take the host strategies, and the requests
    cross between the paths (joins raise the count, finishes lower it) losslessly: every request as the host path
    gives it; none of the steps goes to the device when the bound is never reached."""
    model, spec, prompts, configs, want, _ = ref
    n = len(configs)
    joins = [i // 3 * 2 for i in range(n)]  # 3 at a time, two steps apart: the running count rises and falls
    m = _engine(model, n, spec=spec, device_min=4)
    assert _drive(m, prompts, configs, joins)[0] == want
    c = m.engine.counters
    assert 0 < c.device_steps < c.decode_steps
    never = _engine(model, n, spec=spec, device_min=n + 1)
    assert _drive(never, prompts, configs, joins)[0] == want and never.engine.counters.device_steps == 0


def test_streamed_blocks_equal_the_host_path(ref):
    model, spec, prompts, configs, want, _ = ref
    pick = sorted(range(len(configs)), key=lambda i: -want[i][2])[:4]  # the longest answers
    args = ([prompts[i] for i in pick], [configs[i] for i in pick], [0, 0, 1, 1])
    host = _drive(_engine(model, 4, device_step=False, spec=spec), *args, stream=True)
    dev = _drive(_engine(model, 4, spec=spec), *args, stream=True)
    assert dev[1] == host[1] and any(len(c) > 1 for c in dev[1].values())  # chunks arrived while running


def test_load_then_store_restores_the_host_state(ref):
    """Slots.load / store convert a mid-decode WindowState and its pending batch without loss."""
    model, spec, prompts, configs, _, _ = ref
    m = _engine(model, 1, device_step=False, spec=spec)
    for cfg in (configs[3], configs[8], configs[13]):
        seq = m.engine.prepare(m.tokenizer.encode(prompts[1]), cfg)
        m.engine.add(seq)
        with torch.inference_mode():
            for _ in range(4):
                m.engine.step()
        if seq.batch is None:
            continue
        assert_slot_round_trip(seq.strategy, seq.state, seq.batch, len(seq.state.canvas) + 5, 8)
        m.engine.abort(seq.id)
        m.engine.step()


def _mid_decode(ref) -> list:
    """Requests of three strategies after their prefill and one decode step on the host path (the live ones)."""
    model, spec, prompts, configs, _, _ = ref
    m = _engine(model, 3, device_step=False, spec=spec)
    seqs = [m.engine.prepare(m.tokenizer.encode(prompts[i]), configs[c]) for i, c in ((1, 3), (2, 8), (0, 13))]
    for seq in seqs:
        m.engine.add(seq)
    with torch.inference_mode():
        for _ in range(2):  # the three prompts' prefill, one decode step
            m.engine.step()
    live = [s for s in seqs if s.batch is not None]
    assert len(live) >= 2
    return live


def test_requests_load_and_store_together_as_one_at_a_time(ref):
    """Requests joining (or leaving) the device path in one step: Slots.load_many writes each field's rows in one
    copy and store_many reads them back in one, as loading / storing each request alone does (mid-decode states of
    three strategies)."""
    live = _mid_decode(ref)
    width = max(len(s.state.canvas) for s in live) + 5
    assert_slots_round_trip([(s.strategy, s.state, s.batch) for s in live], width, 8)


def test_finished_requests_store_what_their_results_read(ref):
    """Slots.store_done (the requests a device step finished): their host states get the settled canvas, lengths,
    rounds, EOS and round cap that the full store_many gives them, from one read (mid-decode states of three
    strategies, marked done in their slots, one of them at its round cap)."""
    live = _mid_decode(ref)
    where = list(range(len(live), 0, -1))
    slots = Slots.empty(len(live) + 1, max(len(s.state.canvas) for s in live) + 5, 8, torch.device("cpu"),
                        live[0].state.pred_prob.dtype)
    slots.load_many(where, [(s.strategy, s.state, s.batch, 0) for s in live])
    slots.ints[:, I["done"]] = 1
    slots.ints[where[0], I["capped"]] = 1
    full, light = copy.deepcopy([s.state for s in live]), copy.deepcopy([s.state for s in live])
    slots.store_many(where, [s.strategy for s in live], full)
    with torch.inference_mode():  # the engine's mode
        slots.store_done(where, [s.strategy for s in live], light)
    for a, b in zip(full, light):
        assert torch.equal(a.canvas, b.canvas)
        assert (a.cached, a.rounds, a.eos_at, a.done, a.hit_round_cap, a.pending, a.last_fill) == \
            (b.cached, b.rounds, b.eos_at, b.done, b.hit_round_cap, b.pending, b.last_fill)
    assert [s.hit_round_cap for s in light] == [True] + [False] * (len(live) - 1) and all(s.done for s in light)


def test_ineligible_requests_stay_on_the_host(ref):
    model, _, _, _, _, _ = ref
    m = _engine(model, 2)
    cfg = lambda **o: lopa.decode_config(None, model.model_type, gen_length=8, **o)  # noqa: E731
    seq = lambda c: m.engine.prepare([5, 6, 7], c)  # noqa: E731
    assert seq(cfg(strategy="lopa", k=2)).device_ok
    for c in (cfg(strategy="lopa", k=2, trace=True), cfg(strategy="lopa", k=2, temperature=0.5),
              cfg(strategy="lopa", k=2, branch_confidence="random"),
              cfg(strategy="dream", steps=4)):
        assert not seq(c).device_ok, c


def test_a_failing_update_fails_the_step_not_a_token(ref, monkeypatch):
    """An error inside the batched iteration ends every request with it (Engine.generate's fail_all); the
    engine is empty and decodes exactly afterwards."""
    model, spec, prompts, configs, want, _ = ref
    m = _engine(model, 4, spec=spec)
    real, calls = batched.accept, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device update failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "accept", flaky)
    with pytest.raises(RuntimeError, match="device update failed"), torch.inference_mode():
        lopa.generate_many(m, prompts[:4], configs[:4])
    assert not m.engine.has_work() and m.engine.num_running == 0
    assert _drive(m, prompts[:4], configs[:4], [0] * 4)[0] == want[:4]


@pytest.mark.filterwarnings("error:the device path's update did not compile")  # no silent fallback to eager
def test_the_compiled_update_equals_the_host_path_and_compiles_only_at_start_up(tiny_dream_dir, monkeypatch):
    """RunnerConfig.fuse on a GPU compiles the device path's update (engine/device.py: compiled_update), traced here
    through dynamo with the graph run as traced: each phase traces whole (fullgraph) and, dynamic in the step's
    sizes, compiles at most twice over the whole warm-up (one request apart), then nothing compiles while varied
    requests run (torch.compile set to fail on a recompile); every step is a device step and the tokens and
    forwards equal the host strategies'. The slots' fixed widths are static in its graphs. After the warm-up a key
    it did not warm runs batched's own functions."""
    from lopa.engine import device

    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", dtype="float64"))
    prompts = ["Tom has 12 apples and", "The cat sat", "one two three four five six", "Mia has"]
    cfgs = [lopa.DecodeConfig(strategy=s, k=k, gen_length=24, block_size=8, tau=0.5)
            for s, k in (("lopa", 3), ("d2f", 0), ("lopa", 7), ("threshold", 0))]
    host = _engine(model, 4, device_step=False)
    want = [(r.token_ids, r.stats.decode_forwards) for r in lopa.generate_many(host, prompts, cfgs)]
    m = _engine(model, 4, static=True, attention="flex", max_positions=512)
    assert m.engine.device.update is batched  # the runner does not fuse on a CPU
    with traced_update(monkeypatch) as (m.engine.device.update, counts, slot_shapes):
        m.runner.warmup(256)
        m.engine.device.warmup([key[:2] for key in m.runner.graphs.warmup_keys(256)])
        assert set(counts) == set(device.PHASES) and all(1 <= c <= 2 for c in counts.values()), counts
        # the slots' fixed widths are constants of the graphs (13% less compiling on a CPU with Inductor, no gain
        # measured on an H100); the slot count and width stay symbols, so a pool of another size reuses the graphs
        assert all(type(slot_shapes[f][1]) is int for f in ("look", "ints", "floats")), slot_shapes
        assert all(type(d) is not int for d in slot_shapes["canvas"]), slot_shapes
        with torch.compiler.set_stance("fail_on_recompile"):
            got = [(r.token_ids, r.stats.decode_forwards) for r in lopa.generate_many(m, prompts, cfgs)]
            assert got == want
            c = m.engine.counters
            assert c.device_steps == c.decode_steps > 0 and c.eager_decode_steps == 0
            # a key the warm-up did not capture (a request past its query buckets) runs eagerly, compiling nothing
            long = lopa.DecodeConfig(strategy="lopa", k=7, gen_length=48, block_size=48, tau=0.5)  # 8 x 48 queries
            assert lopa.generate(m, prompts[0], long).token_ids == lopa.generate(host, prompts[0], long).token_ids
            assert m.engine.counters.eager_decode_steps > 0


def test_an_update_that_does_not_compile_runs_unfused_with_a_warning(tiny_dream_dir):
    """Where torch.compile fails on the update (here a backend that raises), the step runs batched's own phases,
    with one warning, and the tokens are the host path's."""
    from lopa.engine import device

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    cfg = lopa.DecodeConfig(strategy="lopa", k=3, gen_length=16, block_size=8, tau=0.5)
    m = _engine(model, 2)
    m.engine.device.update = device.compiled_update.__wrapped__(backend=broken)
    torch._dynamo.reset()
    try:
        with pytest.warns(RuntimeWarning, match="update did not compile"):
            got = lopa.generate(m, "Tom has 12 apples and", cfg)
    finally:
        torch._dynamo.reset()
    want = lopa.generate(_engine(model, 2, device_step=False), "Tom has 12 apples and", cfg)
    assert got.token_ids == want.token_ids and m.engine.counters.device_steps > 0


def _oom_once(fn, when):
    """fn, raising an injected CUDA out-of-memory on the first call whose arguments satisfy ``when`` -> (the
    wrapper, the list of the arguments it failed on)."""
    failed = []

    def call(*args):
        if not failed and when(*args):
            failed.append(args)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return fn(*args)
    return call, failed


def _join_when_first_finishes(engine, first, then):
    """The prepared requests ``first`` join at once; when first[0] finishes, ``then`` joins (with two slots the
    next plan moves first[1] from slot 1 to 0 and admits ``then``). Steps until the engine is empty -> each
    request's final RequestOutput by id, failed ones included."""
    finals = {}
    with torch.inference_mode():
        for seq in first:
            engine.add(seq)
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
                    if out.request_id == first[0].id:
                        engine.add(then)
    return finals


def test_an_out_of_memory_step_that_moved_slots_leaves_the_device_rows_with_their_requests(tiny_dream_dir):
    """A step whose plan moves a running request (compaction) and admits one that grows the KV pool, out of memory
    while growing it: the admitted request fails, the moved one decodes on from its own slot row, as alone."""
    m = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", dtype="float64", max_num_seqs=2,
                                                               device_step=True))
    cfg = dict(strategy="lopa", k=2, block_size=4, tau=0.5)
    want = lopa.generate(m, [5, 6, 7, 8, 9, 10], gen_length=24, **cfg)
    engine, runner = m.engine, m.runner
    short, kept = (engine.prepare(p, want.config.replace(gen_length=g)) for p, g in (([11, 12, 13], 4),
                                                                                     ([5, 6, 7, 8, 9, 10], 24)))
    grows = engine.prepare(list(range(5, 305)), want.config.replace(gen_length=8))  # a larger slot capacity
    def grows_pool(_, positions):
        return runner.pool is not None and positions > runner.pool.capacity

    runner.reserve, failed = _oom_once(runner.reserve, grows_pool)
    finals = _join_when_first_finishes(engine, [short, kept], grows)
    assert failed and isinstance(finals[grows.id].error, lopa.OutOfMemoryError)
    assert finals[kept.id].error is None and finals[kept.id].result.token_ids == want.token_ids
    assert engine.counters.device_steps == engine.counters.decode_steps > 0


def test_an_out_of_memory_slot_move_fails_every_request_and_the_engine_goes_on(tiny_dream_dir):
    """A prefill step that moves a running request (compaction) runs out of memory moving its KV: the scheduler
    has renumbered the slots, so the moved request (not in the prefill) must not go on over the old slots. Every
    request in the engine fails with OutOfMemoryError, the engine is empty and decodes the next request as alone."""
    m = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", dtype="float64", max_num_seqs=2,
                                                               device_step=True))
    cfg = lopa.DecodeConfig(strategy="lopa", k=2, block_size=4, tau=0.5, gen_length=24)
    want = lopa.generate(m, [5, 6, 7, 8, 9, 10], cfg)
    engine, runner = m.engine, m.runner
    short, kept, joins = (engine.prepare(p, cfg.replace(gen_length=g)) for p, g in (([11, 12, 13], 4),
                                                                                    ([5, 6, 7, 8, 9, 10], 24),
                                                                                    ([7, 8, 9], 8)))
    runner.move, failed = _oom_once(runner.move, lambda moves: bool(moves))
    finals = _join_when_first_finishes(engine, [short, kept], joins)
    assert failed and finals[short.id].error is None
    assert all(isinstance(finals[s.id].error, lopa.OutOfMemoryError) for s in (kept, joins))
    again = lopa.generate(m, [5, 6, 7, 8, 9, 10], cfg)
    assert again.token_ids == want.token_ids and again.stats.decode_forwards == want.stats.decode_forwards


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["captured", "eager"])
def test_device_step_equals_the_host_path_on_gpu(tiny_dream_dir, cuda_graphs):
    """On a GPU the device step (queries, forward, update, commit) is captured per key and replayed (or runs
    eagerly without CUDA graphs); float32: the same tokens as the host strategies on the same path."""
    runner = dict(device="cuda", dtype="float32", max_num_seqs=4, cuda_graphs=cuda_graphs)
    host = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, device_step=False))
    dev = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, device_step=True))
    prompts = ["Tom has 12 apples and", "The cat sat", "A B C", "one two"]
    for strategy in ("d2f", "lopa"):
        for _ in range(3):  # eager first, then captured, then replayed
            a = lopa.generate_many(host, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
            b = lopa.generate_many(dev, prompts, strategy=strategy, k=3, gen_length=40, block_size=8)
            assert [r.token_ids for r in a] == [r.token_ids for r in b]
            assert [r.stats.decode_forwards for r in a] == [r.stats.decode_forwards for r in b]
    assert any(graph is not None for graph, _ in dev.engine.device.graphs.values()) == cuda_graphs
    assert dev.engine.counters.device_steps == dev.engine.counters.decode_steps


def test_runner_config_picks_the_path(tiny_dream_dir):
    """RunnerConfig.device_step: None ("auto", the default) = on where the warm-up captures its graphs (a GPU), so
    off on a CPU; True takes the device path through the public API."""
    assert lopa.RunnerConfig().device_step is None
    auto = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    on = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", device_step=True))
    assert auto.engine.device is None and on.engine.device is not None
    a, b = (lopa.generate(m, "Tom has 12 apples and", strategy="lopa", k=3, gen_length=16, block_size=8)
            for m in (auto, on))
    assert a.token_ids == b.token_ids and a.stats.decode_forwards == b.stats.decode_forwards
    assert on.engine.counters.device_steps == on.engine.counters.decode_steps > 0
    with pytest.raises(lopa.ConfigError, match="device_step"):
        lopa.RunnerConfig(device_step="yes")
    with pytest.raises(lopa.ConfigError, match="device_step_min"):
        lopa.RunnerConfig(device_step_min=0)
    # device_step_min None: every step where the update is compiled or device_step forces the path, else 3 running
    # requests where the path is automatic
    assert on.engine.device_min == 1 and lopa.RunnerConfig().device_step_min is None
    assert device_step_min_of(lopa.RunnerConfig(), compiled=False) == DEVICE_STEP_MIN_UNFUSED == 3
    assert device_step_min_of(lopa.RunnerConfig(), compiled=True) == 1
    assert device_step_min_of(lopa.RunnerConfig(device_step=True), compiled=False) == 1
    assert device_step_min_of(lopa.RunnerConfig(device_step_min=2), compiled=True) == 2
    # device_step_min: one request alone takes the host path, two at once the device path
    two = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", device_step=True, device_step_min=2,
                                                                    max_num_seqs=2))
    assert lopa.generate(two, "Tom has 12 apples and", strategy="lopa", k=3, gen_length=16,
                         block_size=8).token_ids == a.token_ids
    assert two.engine.counters.device_steps == 0 < two.engine.counters.decode_steps
    lopa.generate_many(two, ["Tom has 12 apples and", "The cat sat"], lopa.DecodeConfig(strategy="d2f", gen_length=16,
                                                                                      block_size=8))
    assert two.engine.counters.device_steps > 0


def test_compile_update_chooses_the_update_where_the_runner_fuses(tiny_dream_dir, monkeypatch):
    """RunnerConfig.compile_update: where the runner fuses (a GPU; here a fusing runner on the CPU) the device path
    runs compiled_update's phases, with compile_update=False batched's own, as it does wherever the runner does not
    fuse; load_model passes it on (a CPU runner never fuses). None (the default, "auto") compiles it for a model
    under COMPILE_UPDATE_MAX_PARAMS parameters: load_model counts the model's."""
    from lopa.engine import device

    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    loaded = model.loaded

    def update(fuse: bool, compile_update: bool):
        runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=2, fuse=fuse)
        return Engine(runner, loaded.spec, 2, device_step=True, compile_update=compile_update).device.update

    auto, on, off = (lopa.RunnerConfig(compile_update=c) for c in (None, True, False))
    assert lopa.RunnerConfig().compile_update is None
    assert compiles_update(auto, True, COMPILE_UPDATE_MAX_PARAMS - 1)
    assert not compiles_update(auto, True, COMPILE_UPDATE_MAX_PARAMS)
    assert compiles_update(on, True, 10 * COMPILE_UPDATE_MAX_PARAMS) and not compiles_update(off, True, 1)
    assert not any(compiles_update(c, False, 1) for c in (auto, on))  # a runner that does not fuse: eager
    seen = []
    monkeypatch.setattr(lopa.api, "compiles_update", lambda runner, fused, params: seen.append((fused, params)))
    lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    assert seen == [(False, sum(p.numel() for p in loaded.model.parameters()))]
    monkeypatch.undo()
    assert update(True, True) is device.compiled_update()
    assert update(True, False) is batched and update(False, True) is batched
    off = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", device_step=True,
                                                                    compile_update=False))
    assert off.engine.device.update is batched
    with pytest.raises(lopa.ConfigError, match="compile_update"):
        lopa.RunnerConfig(compile_update="no")


def test_flat_queries_reaches_the_device_path(tiny_dream_dir):
    """RunnerConfig.flat_queries (off by default): load_model gives the engine's device path a flat tile, or none."""
    runner = dict(device="cpu", device_step=True)
    assert lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner)).engine.device.flat_tile is None
    assert lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, flat_queries=True)
                           ).engine.device.flat_tile == 1
    with pytest.raises(lopa.ConfigError, match="flat_queries"):
        lopa.RunnerConfig(flat_queries="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="start-up capture needs a GPU")
def test_warm_up_captures_the_device_path_by_default_on_gpu(tiny_dream_dir, monkeypatch):
    """On a GPU with the warm-up the device path is on by default and its graphs are captured inside load_model,
    each launched once there (a graph's first launch uploads it: not the first request's cost); then varied prompts
    and k run with torch.compile set to fail on any recompile, the counters report no capture, recompile or eager
    step after start-up, and the tokens equal the host strategies' on the same static path."""
    runner = dict(device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=2048, warmup=True,
                  device_step_min=1)  # every step on the device path (the default leaves one or two on the host)
    launched, replay = set(), torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (launched.add(id(graph)), replay(graph))[1])
    dev = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner))
    captured = [g for g, _ in dev.engine.device.graphs.values()]
    captured += [st.graph for st in dev.runner.graphs.statics.values()]
    assert captured and all(g is not None and id(g) in launched for g in captured)
    monkeypatch.undo()
    host = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, device_step=False))
    assert dev.engine.device is not None and dev.engine.device.warm
    assert dev.engine.device.update is not batched  # fuse (the default) compiles the update on a GPU
    stats = dev.runner.graphs.stats
    assert stats.captures == stats.warmup_graphs == 2 * len(host.runner.graphs.statics)
    prompts = ["a", "Tom has 12 apples and " * 12, "The cat sat", "one two three four five six seven"]
    cfgs = [lopa.DecodeConfig(strategy=s, k=k, gen_length=24, block_size=8)
            for s, k in (("lopa", 7), ("d2f", 0), ("lopa", 3), ("threshold", 0))]
    want = [r.token_ids for r in lopa.generate_many(host, prompts, cfgs)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [r.token_ids for r in lopa.generate_many(dev, prompts, cfgs)]
    assert got == want
    c = dev.engine.counters
    assert c.device_steps == c.decode_steps > 0
    assert c.captures_after_start == 0 and c.recompiles_after_start == 0 and c.eager_decode_steps == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="start-up capture needs a GPU")
def test_step_budget_on_gpu_runs_no_step_eagerly(tiny_dream_dir):
    """Issue 25 on a GPU: four lopa k=3 requests (up to 4 x 24 queries each) with max_num_batched_tokens 256, so
    all four together have no captured shape: with the step budget every decode step replays a captured graph
    (0 eager, partial steps instead), nothing captures or recompiles, and the tokens equal the host strategies'
    on the same static path."""
    runner = dict(device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=256, device_step_min=1)
    dev = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, warmup=True))
    ref = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(**runner, warmup=True, device_step=False))
    prompts = ["a b", "Tom has 12 apples and", "The cat sat", "one two three four five six seven"]
    cfg = lopa.DecodeConfig(strategy="lopa", k=3, gen_length=24, block_size=8)
    want = [r.token_ids for r in lopa.generate_many(ref, prompts, cfg)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [r.token_ids for r in lopa.generate_many(dev, prompts, cfg)]
    assert got == want
    c = dev.engine.counters
    assert c.device_steps == c.decode_steps > 0 and c.partial_steps > 0 and c.eager_decode_steps == 0
    assert c.captures_after_start == 0 and c.recompiles_after_start == 0


def test_progress_callbacks_see_the_canvas(ref):
    """api.generate's on_step reads the state's canvas after every forward: current on the device path too."""
    model, spec, prompts, configs, want, _ = ref
    i = max(range(len(configs)), key=lambda j: want[j][1])  # the most forwards
    seen = {}
    for device_step in (False, True):
        m = _engine(model, 2, device_step=device_step, spec=spec)
        seen[device_step] = counts = []
        lopa.generate(m, prompts[i], configs[i],
                      on_step=lambda state: counts.append(int((state.canvas != spec.mask_id).sum())))
    assert seen[True] == seen[False] and len(set(seen[True])) > 2


@pytest.mark.diagonal
def test_step_budget_keeps_every_device_step_on_a_warmed_shape(ref):
    """Issue 25's step budget on the device path, warmed up as load_model does (bodies run once instead of a
    capture): six lopa requests (k 1 and 3, the warmed measure and branch score, the model's own EOS) for four
    slots, whose decode steps together pass the warmed (B, Qb) set (B bucket x Qb <= 128) while each alone fits
    (4 x 24 queries at most). Without the budget
    decode steps run eagerly; with it none does, the requests that wait keep their slot rows through the
    rotations, and tokens, forwards and winners equal the host strategies'."""
    model, _, prompts, _, _, _ = ref
    spec = model.loaded.spec
    configs = [lopa.decode_config(None, model.model_type, strategy="lopa", k=k, gen_length=g, block_size=8, tau=0.5)
               for k, g in ((3, 24), (1, 16), (3, 16), (1, 24), (3, 24), (1, 16))]
    joins = [0, 0, 0, 0, 2, 2]
    want = _drive(_engine(model, 4, device_step=False, spec=spec), prompts[:6], configs, joins)[0]
    counts = []
    for budget in (False, True):
        m, keys = _warmed(model, spec, 4, max_tokens=128)
        if not budget:
            m.engine.scheduler.take = None  # every running request in every decode step (before the budget)
        assert _drive(m, prompts[:6], configs, joins)[0] == want
        c = m.engine.counters
        assert c.device_steps == c.decode_steps and set(m.engine.device.graphs) == keys
        counts.append(c)
    before, after = counts
    assert before.eager_decode_steps > 0 and before.partial_steps == 0
    assert after.eager_decode_steps == 0 and after.partial_steps > 0 and after.captures_after_start == 0


def test_step_budget_leaves_a_device_step_of_another_branch_score_whole(ref):
    """The device path's warm-up captures the default branch score only: a step of lopa requests scored by
    "count" runs eagerly whatever its size, so the budget does not split it (splitting would only add steps):
    no partial step, and the host strategies' tokens."""
    model, _, prompts, _, _, _ = ref
    spec = model.loaded.spec
    configs = [lopa.decode_config(None, model.model_type, strategy="lopa", k=3, gen_length=16, block_size=8, tau=0.5,
                                  branch_confidence="count") for _ in range(4)]
    want = _drive(_engine(model, 4, device_step=False, spec=spec), prompts[:4], configs, [0] * 4)[0]
    m, _ = _warmed(model, spec, 4, max_tokens=128)
    assert _drive(m, prompts[:4], configs, [0] * 4)[0] == want
    c = m.engine.counters
    assert c.device_steps == c.decode_steps > 0 and c.partial_steps == 0 and c.eager_decode_steps > 0


@pytest.mark.diagonal
def test_the_flat_forward_decodes_as_the_padded_rows(ref, tile=1):
    """DevicePath.flat_tile: the steps whose queries fit one of their key's flat counts take the forward on the flat
    query axis (each request's queries back to back; ModelRunner.forward_flat), the others the padded rows: every
    request gets the host strategies' tokens, forwards and winners, staggered, and all at once in fewer slots than
    requests (slot moves)."""
    model, spec, prompts, configs, want, _ = ref
    n = len(configs)
    for slots, joins in ((n, [i // 3 * 2 for i in range(n)]), (3, [0] * n)):
        m = _engine(model, slots, spec=spec, static=True, attention="flex")
        m.engine.device.flat_tile, m.engine.device.flat_min = tile, 0
        flat, calls = m.runner.forward_flat, []
        m.runner.forward_flat = lambda inputs, T, *rest: calls.append((T, *unpack(inputs)[0].shape)) or \
            flat(inputs, T, *rest)
        assert _drive(m, prompts, configs, joins)[0] == want, (slots, joins)
        assert 0 < len(calls) <= m.engine.counters.device_steps
        assert all(T in flat_counts(B, Qb, tile, 0) for T, B, Qb in calls)  # at most 3/4 of the padded queries


def test_the_flat_forward_commits_what_the_padded_rows_commit(ref):
    """Stepping side by side with the padded device path (lopa k = 3 and 1, d2f, threshold; windows of different
    widths in one step): after every step each slot's committed K/V and last hidden state equal the padded path's
    (float64: to rounding; float32: closely), and so do the outputs."""
    model = ref[0]
    configs = [lopa.decode_config(None, model.model_type, **o) for o in (
        dict(strategy="lopa", k=3, base="threshold", block_size=16, gen_length=48, tau=0.05),
        dict(strategy="lopa", k=1, block_size=8, gen_length=32, tau=0.3),
        dict(strategy="d2f", block_size=8, gen_length=32, tau=0.3),
        dict(strategy="threshold", block_size=16, gen_length=32, tau=0.2))]
    engines = [_engine(model, len(configs), static=True, attention="flex").engine for _ in range(2)]
    engines[1].device.flat_tile, engines[1].device.flat_min = 8, 0  # queries padded to a multiple of 8, any size
    forward_flat, flat_steps = engines[1].runner.forward_flat, []
    engines[1].runner.forward_flat = lambda *args: flat_steps.append(args[1]) or forward_flat(*args)
    for engine in engines:
        for p, c in zip(PROMPTS, configs):
            engine.add(engine.prepare(model.tokenizer.encode(p), c))
    dtype = model.loaded.model.embed.weight.dtype
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    steps = 0
    with torch.inference_mode():
        while engines[0].has_work():
            outs = [engine.step() for engine in engines]
            assert [(o.request_id, o.new_ids, o.finished) for o in outs[0]] == \
                [(o.request_id, o.new_ids, o.finished) for o in outs[1]]
            a, b = (engine.runner.pool for engine in engines)
            if a is None or b is None:  # both idle: the pools given back
                assert a is b is None
                continue
            assert a.lengths == b.lengths
            for slot, length in enumerate(a.lengths):
                if length:
                    torch.testing.assert_close(b.kv[:, :, slot, :, :length], a.kv[:, :, slot, :, :length], **tol)
                    torch.testing.assert_close(b.last_hidden[slot], a.last_hidden[slot], **tol)
            steps += engines[1].last_step is not None and engines[1].last_step.kind == "decode"
    assert engines[1].counters.device_steps == engines[0].counters.device_steps >= 4 and steps >= 4
    assert len(flat_steps) >= 4  # on the flat axis
