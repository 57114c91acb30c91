"""Request schemas -> DecodeConfig, and settled ids -> text deltas (no engine, no HTTP)."""

import pytest
from pydantic import ValidationError

from lopa.errors import ConfigError
from lopa.serve import protocol
from lopa.serve.text import TextStream


class ByteTokenizer:
    """Token id = one UTF-8 byte, decoded with replacement like a byte-level BPE at a block edge."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_openai_fields_and_lopa_extra_fields_map_onto_decode_config():
    req = protocol.CompletionRequest.model_validate_json(
        b'{"model": "m", "prompt": "x", "max_tokens": 40, "temperature": 0.5, "top_p": 0.9, "seed": 7,'
        b' "strategy": "lopa", "k": 3, "tau": 0.8, "block_size": 8, "preset": "math"}')
    cfg = protocol.decode_settings(req, "dream", n_prompt=10, context=512)
    assert (cfg.gen_length, cfg.temperature, cfg.top_p, cfg.seed) == (40, 0.5, 0.9, 7)
    assert (cfg.strategy, cfg.k, cfg.tau, cfg.block_size) == ("lopa", 3, 0.8, 8)
    assert cfg.add_threshold == 0.1  # the math preset's, untouched
    chat = protocol.ChatRequest.model_validate_json(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],'
        b' "max_completion_tokens": 12}')
    assert protocol.decode_settings(chat, "dream", 5, 512).gen_length == 12 and chat.messages[0].text() == "hi"


def test_bad_values_name_the_request_field():
    with pytest.raises(ValidationError) as info:
        protocol.CompletionRequest.model_validate_json(b'{"model": "m", "prompt": "x", "max_tokens": 1.5}')
    assert info.value.errors()[0]["loc"] == ("max_tokens",)
    req = protocol.CompletionRequest.model_validate_json(b'{"model": "m", "prompt": "x", "max_tokens": 500}')
    with pytest.raises(ConfigError) as too_long:
        protocol.decode_settings(req, "dream", n_prompt=20, context=512)
    assert protocol.error_param(too_long.value) == "max_tokens"
    req = protocol.CompletionRequest.model_validate_json(b'{"model": "m", "prompt": "x", "compat": "published"}')
    with pytest.raises(ConfigError, match="compat"):
        protocol.decode_settings(req, "llada", 5, 4096)


def test_a_seedless_request_gets_a_fresh_seed():
    req = protocol.CompletionRequest.model_validate_json(b'{"model": "m", "prompt": "x", "temperature": 1.0}')
    seeds = {protocol.decode_settings(req, "dream", 1, 512).seed for _ in range(8)}
    assert len(seeds) > 1


def test_an_incomplete_utf8_sequence_at_a_block_edge_is_held_back():
    text = TextStream(ByteTokenizer(), [])
    e_acute = list("é".encode())  # two bytes
    assert text.push([ord("a"), e_acute[0]], finished=False) == "a"
    assert text.push([e_acute[1], ord("b")], finished=False) == "éb"
    assert text.push([], finished=True) == "" and text.text == "aéb"


def test_a_stop_string_split_over_blocks_is_cut_and_nothing_after_it_is_sent():
    text = TextStream(ByteTokenizer(), ["END"])
    deltas = [text.push(list(b"abcE"), False), text.push(list(b"NDxyz"), False), text.push(list(b"more"), True)]
    assert deltas == ["abc", "", ""] and text.text == "abc" and text.stopped
    plain = TextStream(ByteTokenizer(), ["END"])
    assert "".join([plain.push(list(b"abE"), False), plain.push(list(b"x"), True)]) == "abEx" and not plain.stopped


def test_create_app_checks_its_arguments():
    from lopa.serve import create_app

    with pytest.raises(ConfigError, match="model"):
        create_app("default_model")


def test_create_app_refuses_a_config_that_is_not_a_serve_config(model):
    from lopa.serve import create_app

    with pytest.raises(ConfigError, match="config"):
        create_app(model, {"api_key": "x"})
