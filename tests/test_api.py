"""The public API end to end on tiny random checkpoints: every strategy runs, counts are honest, errors are typed."""

import pytest

import lopa
from lopa import DecodeConfig, generate, load_model

STRATEGIES = ["threshold", "d2f", "lopa", "dream"]
SMALL = dict(gen_length=24, block_size=8)


@pytest.fixture(scope="module")
def dream(tiny_dream_dir):
    return load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))


@pytest.fixture(scope="module")
def llada(tiny_llada_dir):
    return load_model(tiny_llada_dir, runner=lopa.RunnerConfig(device="cpu"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_every_strategy_runs_and_counts(family, strategy, request):
    model = request.getfixturevalue(family)
    res = generate(model, "The cat sat on", strategy=strategy, k=3, steps=12, **SMALL)
    s = res.stats
    assert 1 <= s.generated_tokens <= SMALL["gen_length"]
    assert s.decode_forwards >= 1
    assert s.tpf == pytest.approx(s.generated_tokens / s.decode_forwards)
    assert model.loaded.spec.mask_id not in res.token_ids  # the default mode never emits the mask token
    eos = set(model.loaded.spec.eos_ids)
    assert all(t not in eos for t in res.token_ids[:-1])  # nothing counted after the first EOS
    assert s.prefill_forwards == (0 if strategy == "dream" else 1)
    if strategy == "lopa":
        assert s.branch_rows > s.decode_forwards  # branches were verified together: one forward, several rows
    else:
        assert s.branch_rows == s.decode_forwards


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_with_seed(dream, strategy):
    cfg = DecodeConfig(strategy=strategy, temperature=0.8, seed=3, k=3, steps=12, **SMALL)
    a, b = generate(dream, "A B C", cfg), generate(dream, "A B C", cfg)
    assert a.token_ids == b.token_ids and a.stats.decode_forwards == b.stats.decode_forwards


@pytest.mark.parametrize("attention", ["full", "block_causal"])
@pytest.mark.parametrize("base", ["d2f", "threshold"])
def test_lopa_k0_equals_its_base(dream, base, attention):
    common = dict(tau=0.3, add_threshold=0.2, complete_threshold=0.6, attention=attention, **SMALL)
    ref = generate(dream, "one two three", strategy=base, **common)
    got = generate(dream, "one two three", strategy="lopa", base=base, k=0, **common)
    assert got.token_ids == ref.token_ids
    assert got.stats.decode_forwards == ref.stats.decode_forwards


def test_tau_one_fills_one_token_per_step(dream):
    for strategy in ("threshold", "d2f"):
        res = generate(dream, "x y", strategy=strategy, tau=1.0, trace=True, complete_threshold=1.0, **SMALL)
        assert res.trace and all(len(step.filled) == 1 for step in res.trace)


def test_trace_records_winners(dream):
    res = generate(dream, "trace me", strategy="lopa", k=3, trace=True, **SMALL)
    assert len(res.trace) == res.stats.decode_forwards
    assert all(0 <= step.winner <= 3 for step in res.trace)


@pytest.mark.parametrize(
    "overrides",
    [dict(tau=0.0), dict(tau=1.5), dict(k=-1), dict(block_size=0), dict(strategy="nope"), dict(confidence="x")],
)
def test_bad_decode_settings_raise_config_error(dream, overrides):
    with pytest.raises(lopa.ConfigError):
        generate(dream, "hi", **overrides)


def test_prompt_longer_than_context(dream):
    limit = dream.loaded.spec.max_length
    with pytest.raises(lopa.PromptTooLongError):
        generate(dream, [5 + i % 50 for i in range(limit)], strategy="d2f", gen_length=8, block_size=8)


def test_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(lopa.CheckpointError):
        load_model(tmp_path / "nowhere", runner=lopa.RunnerConfig(device="cpu"))


def test_unknown_model_type(tiny_dream_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dream_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lopa.UnsupportedModelError):
        load_model(bad, runner=lopa.RunnerConfig(device="cpu"))


def test_token_id_prompt_and_text_prompt_agree(dream):
    ids = dream.tokenizer.encode("same prompt")
    a = generate(dream, "same prompt", strategy="d2f", **SMALL)
    b = generate(dream, ids, strategy="d2f", **SMALL)
    assert a.token_ids == b.token_ids and a.prompt_ids == ids


@pytest.mark.parametrize("overrides", [dict(k=1.5), dict(gen_length=10.7), dict(k=True), dict(tau="0.9"),
                                       dict(seed=None), dict(trace=1), dict(strategy=3)])
def test_decode_config_checks_types(overrides):
    with pytest.raises(lopa.ConfigError, match=next(iter(overrides))):
        DecodeConfig(**overrides)


def test_runner_config_checks_types_and_device():
    for bad in (dict(device="cuda:x"), dict(fuse="no"), dict(dtype=None)):
        with pytest.raises(lopa.ConfigError):
            lopa.RunnerConfig(**bad)


def test_load_model_expands_the_home_folder(tiny_dream_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_dream_dir.parent))
    model = load_model(f"~/{tiny_dream_dir.name}", runner=lopa.RunnerConfig(device="cpu"))
    assert model.path == tiny_dream_dir


def test_messages_use_the_chat_template(dream):
    messages = [{"role": "user", "content": "Hi"}]
    a = generate(dream, messages=messages, strategy="d2f", **SMALL)
    b = generate(dream, "Hi", chat=True, strategy="d2f", **SMALL)
    assert a.prompt_ids == b.prompt_ids == dream.tokenizer.encode(dream.tokenizer.apply_chat_template(messages))
    assert a.token_ids == b.token_ids
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 3}], "Hi"):
        with pytest.raises(lopa.ConfigError, match="messages"):
            generate(dream, messages=bad, **SMALL)
    with pytest.raises(lopa.ConfigError, match="messages"):
        generate(dream, "Hi", messages=messages, **SMALL)


@pytest.mark.parametrize("prompt", ["bad \udcff byte", [1, 10**9], [1, -2], ["a"], 7])
def test_bad_prompts_raise_config_error(dream, prompt):
    with pytest.raises(lopa.ConfigError, match="prompt"):
        generate(dream, prompt, **SMALL)


def test_float64_model_decodes_like_float32(tiny_dream_dir, dream):
    double = load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", dtype="float64"))
    for strategy in ("threshold", "d2f", "lopa"):
        assert generate(double, "A B", strategy=strategy, k=2, **SMALL).token_ids == \
            generate(dream, "A B", strategy=strategy, k=2, **SMALL).token_ids
