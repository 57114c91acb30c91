"""Every public entry point checks what it is given: a typed error naming the argument, never a traceback from
deep inside and never a silent reinterpretation (issue 24, section 3)."""

import math

import pytest
import torch

import lopa
from lopa import ConfigError, DecodeConfig, generate, generate_many, load_model
from lopa.config import RunnerConfig, ServeConfig, decode_config

SMALL = dict(gen_length=8, block_size=8)


@pytest.fixture(scope="module")
def model(tiny_dream_dir):
    return load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu"))


# (what a user might pass, the call, words the ConfigError must name)
BAD_CALLS = {
    "bytes prompt (not token ids)": (lambda m: generate(m, b"Hi", **SMALL), "prompt"),
    "bytearray prompt": (lambda m: generate(m, bytearray(b"Hi"), **SMALL), "prompt"),
    "a set of ids (no order)": (lambda m: generate(m, {5, 6}, **SMALL), "prompt"),
    "bool token ids": (lambda m: generate(m, [True, 5], **SMALL), "prompt"),
    "float token ids": (lambda m: generate(m, [5.0, 6], **SMALL), "prompt"),
    "negative token id": (lambda m: generate(m, [5, -1], **SMALL), "prompt"),
    "2-D tensor of ids": (lambda m: generate(m, torch.ones(2, 2, dtype=torch.long), **SMALL), "prompt"),
    "empty prompt": (lambda m: generate(m, "", **SMALL), "prompt"),
    "empty ids": (lambda m: generate(m, [], **SMALL), "prompt"),
    "mask token as an id": (lambda m: generate(m, [5, m.loaded.spec.mask_id], **SMALL), "mask token"),
    "mask token in the text": (lambda m: generate(m, "<|mask|>", **SMALL), "mask token"),
    "mask token in a chat": (lambda m: generate(m, messages=[{"role": "user", "content": "<|mask|>"}], **SMALL),
                             "mask token"),
    "config as a dict": (lambda m: generate(m, "Hi", {"k": 3}), "config"),
    "config as a str": (lambda m: generate(m, "Hi", "lopa"), "config"),
    "config and preset": (lambda m: generate(m, "Hi", DecodeConfig(), preset="math"), "preset"),
    "preset not a str": (lambda m: generate(m, "Hi", preset=3), "preset"),
    "unknown field": (lambda m: generate(m, "Hi", kk=3), "kk"),
    "chat not a bool": (lambda m: generate(m, "Hi", chat="yes", **SMALL), "chat"),
    "on_step not callable": (lambda m: generate(m, "Hi", on_step=3, **SMALL), "on_step"),
    "model not a LopaModel": (lambda m: generate("model", "Hi"), "model"),
    "messages a str": (lambda m: generate(m, messages="hello", **SMALL), "messages"),
    "unknown role": (lambda m: generate(m, messages=[{"role": "wizard", "content": "x"}], **SMALL), "role"),
    "unknown message key": (lambda m: generate(m, messages=[{"role": "user", "content": "x", "foo": 1}], **SMALL),
                            "foo"),
    "generate_many of a str": (lambda m: generate_many(m, "Hi there", **SMALL), "prompts"),
    "generate_many of bytes": (lambda m: generate_many(m, b"Hi", **SMALL), "prompts"),
    "generate_many configs of dicts": (lambda m: generate_many(m, ["a"], [{"k": 1}]), "config"),
    "generate_many config count": (lambda m: generate_many(m, ["a", "b"], [DecodeConfig()]), "configs"),
    "generate_many bad prompt names its index": (lambda m: generate_many(m, ["a", ""], **SMALL), "prompts[1]"),
    "generate_many on_result not callable": (lambda m: generate_many(m, ["a"], on_result=3, **SMALL), "on_result"),
    "temperature inf": (lambda m: generate(m, "Hi", temperature=math.inf, **SMALL), "temperature"),
    "temperature nan": (lambda m: generate(m, "Hi", temperature=math.nan, **SMALL), "temperature"),
    "seed beyond 64 bits": (lambda m: generate(m, "Hi", seed=2**70, **SMALL), "seed"),
    "negative seed": (lambda m: generate(m, "Hi", seed=-1, **SMALL), "seed"),
    "steps beyond gen_length": (lambda m: generate(m, "Hi", strategy="dream", steps=10**6, gen_length=8), "steps"),
    "compat published on llada": (lambda m: lopa.api.request.check_config(
        DecodeConfig(compat="published"), model_type="llada", step_rows=None), "compat"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_config_error(model, case):
    call, words = BAD_CALLS[case]
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(model)


@pytest.mark.parametrize("kwargs,words", [
    (dict(path=123), "path"), (dict(path=""), "path"), (dict(adapter=5), "adapter"),
    (dict(runner={"device": "cpu"}), "runner"), (dict(runner="cpu"), "runner"),
])
def test_load_model_checks_its_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        load_model(**kwargs)


@pytest.mark.parametrize("kwargs,words", [
    (dict(model_type="gpt2"), "model_type"), (dict(preset=["math"]), "preset"), (dict(top_p=math.nan), "top_p"),
    (dict(tau=math.inf), "tau"), (dict(add_threshold=-math.inf), "add_threshold"), (dict(k=3.0), "k"),
    (dict(strategy=["lopa"]), "strategy"), (dict(gen_length=True), "gen_length"),
])
def test_decode_config_checks_types_ranges_and_finiteness(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        decode_config(**kwargs)


@pytest.mark.parametrize("kwargs,words", [
    (dict(port="80"), "port"), (dict(request_timeout_s=math.inf), "request_timeout_s"),
    (dict(max_pending=True), "max_pending"), (dict(served_model_name=" "), "served_model_name"),
])
def test_serve_config_checks_types_and_finiteness(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ServeConfig(**kwargs)


def test_runner_config_refuses_a_non_finite_timeout():
    with pytest.raises(ConfigError, match="bp_timeout_s"):
        RunnerConfig(bp_timeout_s=math.inf)


def test_what_is_accepted_is_read_as_given(model):
    """Tuples, tensors and numpy-free integer sequences are token ids; an empty list of prompts is no work; a
    prompt of only special tokens other than the mask is a valid prompt."""
    ids = model.tokenizer.encode("the cat")
    ref = generate(model, ids, strategy="d2f", **SMALL).token_ids
    assert generate(model, tuple(ids), strategy="d2f", **SMALL).token_ids == ref
    assert generate(model, torch.tensor(ids), strategy="d2f", **SMALL).token_ids == ref
    assert generate_many(model, []) == []
    eos = model.loaded.spec.eos_ids[0]
    assert generate(model, [eos, eos], strategy="d2f", **SMALL).prompt_ids == [eos, eos]
