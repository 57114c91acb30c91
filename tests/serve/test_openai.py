"""The official openai client against `lopa serve` on loopback: answers equal lopa.generate for the same settings."""

import time

import httpx
import openai
import pytest

import lopa

from .conftest import metric, serving

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
QUESTION = "Ivy has 5 pens and gives away 2. How many pens are left?"
SETTINGS = dict(strategy="lopa", k=3, block_size=8)  # lopa's own fields, sent as extra_body


@pytest.fixture(scope="module")
def expected(model):
    """Solo decodes through lopa.generate, computed before any server drives the engine."""
    return {
        "greedy": lopa.generate(model, PROMPT, gen_length=32, **SETTINGS),
        "chat": lopa.generate(model, QUESTION, chat=True, gen_length=24, **SETTINGS),
        "sampled": lopa.generate(model, PROMPT, gen_length=24, temperature=0.8, seed=5, **SETTINGS),
    }


@pytest.fixture(scope="module")
def server(model, expected):
    with serving(model, api_key="sk-test") as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-test", max_retries=0)


def test_completion_equals_generate_and_usage_counts_like_lopa(client, expected, model):
    want = expected["greedy"]
    got = client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=SETTINGS)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.prompt_tokens == len(want.prompt_ids)
    assert got.usage.completion_tokens == want.stats.generated_tokens
    assert got.usage.decode_forwards == want.stats.decode_forwards
    assert got.usage.tpf == pytest.approx(want.stats.tpf)
    assert got.lopa["strategy"] == "lopa" and got.lopa["k"] == 3


def test_chat_uses_the_template_and_equals_generate_with_chat(client, expected, model):
    want = expected["chat"]
    got = client.chat.completions.create(model=model.path.name, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=24, extra_body=SETTINGS)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_ids)


def test_streaming_concatenates_to_the_answer_and_ends_with_usage(client, expected, model):
    want = expected["greedy"]
    chunks = list(client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True}, extra_body=SETTINGS))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert len(text_chunks) >= 2  # 32 tokens in blocks of 8 arrive in more than one piece
    assert [c.choices[0].finish_reason for c in text_chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == want.stats.generated_tokens

    chat = list(client.chat.completions.create(model=model.path.name, stream=True, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}],
                                               stream_options={"include_usage": True}, extra_body=SETTINGS))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == expected["chat"].text
    assert chat[-1].usage.completion_tokens == expected["chat"].stats.generated_tokens


def test_seed_reproduces_a_sampled_answer(client, expected, model):
    want = expected["sampled"]
    texts = [client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=24, temperature=0.8,
                                       seed=5, extra_body=SETTINGS).choices[0].text for _ in range(2)]
    assert texts == [want.text, want.text]


def test_stop_string_cuts_the_text_streamed_or_not(client, expected, model):
    full = expected["greedy"].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    got = client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, stop=[stop],
                                    extra_body=SETTINGS)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    stream = list(client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, stop=stop,
                                            stream=True, extra_body=SETTINGS))
    assert "".join(c.choices[0].text for c in stream) == cut and stream[-1].choices[0].finish_reason == "stop"


def test_models_health_and_metrics_move(client, server, model):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [model.path.name]
    assert httpx.get(url + "/health").status_code == 200  # open without the key
    assert httpx.get(url + "/metrics").status_code == 401
    auth = {"Authorization": "Bearer sk-test"}
    before = httpx.get(url + "/metrics", headers=auth).text
    client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=16, extra_body=SETTINGS)
    after = httpx.get(url + "/metrics", headers=auth).text
    for name in ('lopa_requests_total{status="ok"}', "lopa_generated_tokens_total", "lopa_prompt_tokens_total",
                 'lopa_engine_steps_total{kind="decode"}', 'lopa_engine_steps_total{kind="prefill"}',
                 "lopa_branch_rows_total", "lopa_request_seconds_count", "lopa_request_tpf_count"):
        assert metric(after, name) > metric(before, name), name


def test_time_to_first_block_counts_streamed_requests_only(client, server, model):
    """lopa_time_to_first_block_seconds: one observation per streamed request, taken when its first settled block
    arrives (before its last token); a non-streamed request, which sends nothing before its end, adds none."""
    url, _ = server
    auth = {"Authorization": "Bearer sk-test"}
    first, latency = "lopa_time_to_first_block_seconds", "lopa_request_seconds"

    def read() -> dict:
        text = httpx.get(url + "/metrics", headers=auth).text
        return {name: metric(text, name) for name in (first + "_count", first + "_sum", latency + "_count")}

    before = read()
    client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=SETTINGS)
    plain = read()
    assert plain[first + "_count"] == before[first + "_count"]
    assert plain[latency + "_count"] == before[latency + "_count"] + 1
    t0 = time.perf_counter()
    chunks = list(client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, stream=True,
                                            extra_body=SETTINGS))
    wall = time.perf_counter() - t0
    streamed = read()
    assert len(chunks) >= 2 and streamed[first + "_count"] == plain[first + "_count"] + 1
    assert 0 < streamed[first + "_sum"] - plain[first + "_sum"] <= wall
