"""Bounded resources: admission refuses what the engine cannot hold (k, the largest forward, the KV budget) before
anything is allocated; requests that fit alone but not together wait; the pool is given back when the engine goes
idle; an out-of-memory inside a step fails only that step's requests."""

import pytest
import torch

import lopa
from lopa import ConfigError, OutOfMemoryError, PromptTooLongError, RunnerConfig
from lopa.config import LLADA_DEFAULTS, PRESETS, DecodeConfig
from lopa.models.tiny import write_tiny_checkpoint

PROMPT = [5, 6, 7, 8, 9, 10]
SMALL = dict(strategy="lopa", k=3, gen_length=16, block_size=8)


@pytest.fixture(scope="module")
def model(tiny_dream_dir):
    return lopa.load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64", max_num_seqs=4))


def test_a_k_above_the_ceiling_is_refused_naming_k_and_the_limit(model):
    with pytest.raises(ConfigError, match=r"^k: 100000 .* 64 \(RunnerConfig.max_lookahead\)"):
        lopa.generate(model, PROMPT, strategy="lopa", k=100000, gen_length=400)
    with pytest.raises(ConfigError, match="max_lookahead"):
        lopa.generate_many(model, [PROMPT, PROMPT], strategy="lopa", k=65, gen_length=8)
    assert model.runner.pool is None and not model.engine.has_work()  # refused before anything was allocated
    assert lopa.generate(model, PROMPT, **SMALL).token_ids  # and the engine serves on


def test_a_forward_larger_than_max_num_batched_tokens_is_refused(model):
    with pytest.raises(ConfigError, match=r"k: with k = 20 and gen_length 400 .* 8400 .* 8192 .*batched_tokens"):
        lopa.generate(model, PROMPT, strategy="lopa", k=20, gen_length=400)
    narrow = lopa.load_model(model.path, runner=RunnerConfig(device="cpu", max_num_batched_tokens=64))
    with pytest.raises(PromptTooLongError, match="gen_length: .*max_num_batched_tokens"):  # dream: the whole sequence
        lopa.generate(narrow, PROMPT, strategy="dream", gen_length=64)
    assert lopa.generate(narrow, PROMPT, strategy="lopa", k=3, gen_length=16, block_size=8).token_ids  # 4 x 16 fits


def test_the_default_bounds_admit_the_papers_settings(tmp_path):
    """Every preset (and D2F-LLaDA's defaults) at gen_length 256 and 512 with k up to 15: K x W <= 16 x 512 = 8192."""
    folder = write_tiny_checkpoint(tmp_path / "long", model_type="dream", seed=0, max_position_embeddings=1024)
    m = lopa.load_model(folder, runner=RunnerConfig(device="cpu"))
    prompt = list(range(5, 205))
    for base in [*PRESETS.values(), DecodeConfig(**LLADA_DEFAULTS)]:
        for gen_length in (256, 512):
            for k in sorted({base.k, 15}):
                seq = m.engine.prepare(prompt, base.replace(gen_length=gen_length, k=k))
                assert seq.strategy.largest_forward(len(prompt)) <= RunnerConfig().max_num_batched_tokens
    assert m.runner.pool is None


def test_a_request_beyond_the_kv_budget_is_refused_and_requests_wait_for_room(tiny_dream_dir, model):
    want = [lopa.generate(model, p, **SMALL).token_ids for p in (PROMPT, PROMPT[:4], PROMPT[1:], PROMPT[2:])]
    probe = lopa.load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64"))
    need = probe.engine.prepare(PROMPT, DecodeConfig(**SMALL)).need
    two_slots = 2 * probe.runner.slot_bytes(256)  # a slot's capacity is the need rounded up to 256 positions
    assert need <= 256
    tight = lopa.load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64", max_num_seqs=4,
                                                                kv_cache_bytes=two_slots))
    with pytest.raises(ConfigError, match=r"k: with k = 14 .*KV positions .*RunnerConfig.kv_cache_bytes"):
        lopa.generate(tight, PROMPT, strategy="lopa", k=14, gen_length=64)
    got = lopa.generate_many(tight, [PROMPT, PROMPT[:4], PROMPT[1:], PROMPT[2:]], **SMALL)
    assert [r.token_ids for r in got] == want  # each fits alone; two at a time fit the budget; the others waited
    assert tight.runner.peak_slots == 2 and tight.runner.peak_bytes <= two_slots
    assert tight.runner.pool is None  # idle: the pool was given back


def _oom_once(runner, monkeypatch):
    real = runner.execute
    calls = []

    def execute(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 327.00 GiB (injected)")
        return real(items)

    monkeypatch.setattr(runner, "execute", execute)
    return calls


def test_an_out_of_memory_step_fails_only_its_requests(model, monkeypatch):
    want = lopa.generate(model, PROMPT, **SMALL)
    engine = model.engine
    first = engine.prepare(PROMPT, want.config)
    engine.add(first)
    with torch.inference_mode():
        outs = engine.step() + engine.step()  # first's prefill, then one decode step
        calls = _oom_once(model.runner, monkeypatch)
        second = engine.prepare(PROMPT[:4], want.config)
        engine.add(second)
        outs += engine.step()  # second's prefill: out of memory
        assert calls == [1]
        (failed,) = [o for o in outs if o.finished]
        assert failed.request_id == second.id and isinstance(failed.error, OutOfMemoryError)
        assert "out of memory in a prefill step of 1 request" in str(failed.error)
        while engine.has_work():
            outs += engine.step()
    (done,) = [o for o in outs if o.request_id == first.id and o.finished]
    assert done.result.token_ids == want.token_ids  # the running request was outside the step: untouched


def test_generate_raises_a_typed_out_of_memory_error_and_the_next_call_succeeds(model, monkeypatch):
    want = lopa.generate(model, PROMPT, **SMALL)
    _oom_once(model.runner, monkeypatch)
    with pytest.raises(OutOfMemoryError, match="ran out of memory"):
        lopa.generate(model, PROMPT, **SMALL)
    assert model.runner.pool is None and not model.engine.has_work()
    assert lopa.generate(model, PROMPT, **SMALL).token_ids == want.token_ids


@pytest.mark.parametrize("field, value", [("max_lookahead", -1), ("max_num_batched_tokens", 0),
                                          ("kv_cache_bytes", 0), ("max_lookahead", 1.5), ("kv_cache_bytes", True)])
def test_runner_config_checks_the_bounds(field, value):
    with pytest.raises(ConfigError, match=field):
        RunnerConfig(**{field: value})
