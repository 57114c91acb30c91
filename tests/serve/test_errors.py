"""Bad input gets its 4xx in OpenAI's error shape naming the field, and the server keeps answering."""

import json

import httpx
import openai
import pytest

from .conftest import metric, serving

KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def server(model):
    with serving(model, api_key="sk-test") as (url, app):
        yield url, app


def good(m, **extra):
    return {"model": m.path.name, "prompt": "Question: 1 + 2?\nAnswer:", "max_tokens": 8, "block_size": 8, **extra}


def raw(body: dict) -> bytes:
    """JSON with NaN / Infinity literals (Python's json writes them; httpx's json= refuses to)."""
    return json.dumps(body).encode()


def chat(m, **extra):
    return {"model": m.path.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


# (what is wrong, route, body builder, the field the error must name)
BAD = [
    ("wrong type", "completions", lambda m: good(m, max_tokens="ten"), "max_tokens"),
    ("negative max_tokens", "completions", lambda m: good(m, max_tokens=-1), "max_tokens"),
    ("huge max_tokens", "completions", lambda m: good(m, max_tokens=10**9), "max_tokens"),
    ("prompt longer than the context", "completions", lambda m: good(m, prompt=[5] * 600), "prompt"),
    ("token id outside the vocabulary", "completions", lambda m: good(m, prompt=[5, 10**6]), "prompt"),
    ("empty prompt", "completions", lambda m: good(m, prompt=""), "prompt"),
    ("missing prompt", "completions", lambda m: {"model": m.path.name}, "prompt"),
    ("unknown model", "completions", lambda m: good(m, model="gpt-4"), "model"),
    ("tau = 0", "completions", lambda m: good(m, tau=0), "tau"),
    ("k = -1", "completions", lambda m: good(m, k=-1), "k"),
    ("unknown strategy", "completions", lambda m: good(m, strategy="beam"), "strategy"),
    ("unknown preset", "completions", lambda m: good(m, preset="nope"), "preset"),
    ("n > 1", "completions", lambda m: good(m, n=2), "n"),
    ("logprobs", "completions", lambda m: good(m, logprobs=2), "logprobs"),
    ("unknown field", "completions", lambda m: good(m, tools=[]), "tools"),
    ("bool as int", "completions", lambda m: good(m, k=True), "k"),
    ("bad role", "chat/completions", lambda m: chat(m, messages=[{"role": "wizard", "content": "x"}]), "messages"),
    ("no messages", "chat/completions", lambda m: chat(m, messages=[]), "messages"),
    ("n > 1 in chat", "chat/completions", lambda m: chat(m, n=3), "n"),
    # issue 24: the same checks as lopa.generate (lopa/request.py), every numeric setting finite and in range
    ("temperature NaN", "completions", lambda m: raw(good(m, temperature=float("nan"))), "temperature"),
    ("tau Infinity", "completions", lambda m: raw(good(m, tau=float("inf"))), "tau"),
    ("seed beyond 64 bits", "completions", lambda m: good(m, seed=2**70), "seed"),
    ("negative token id", "completions", lambda m: good(m, prompt=[5, -1]), "prompt"),
    ("the mask token as text", "completions", lambda m: good(m, prompt="Q <|mask|>"), "prompt"),
    ("the mask token as an id", "completions", lambda m: good(m, prompt=[5, m.loaded.spec.mask_id]), "prompt"),
    ("the mask token in a chat", "chat/completions",
     lambda m: chat(m, messages=[{"role": "user", "content": "<|mask|>"}]), "messages"),
    ("k_policy load without a step row budget", "completions", lambda m: good(m, k_policy="load"), "k_policy"),
    ("dream steps beyond max_tokens", "completions", lambda m: good(m, strategy="dream", steps=100), "steps"),
    ("gen_length (max_tokens sets it)", "completions", lambda m: good(m, gen_length=8), "gen_length"),
    ("trace (no per-step record)", "completions", lambda m: good(m, trace=True), "trace"),
    ("messages a string", "chat/completions", lambda m: chat(m, messages="hello"), "messages"),
    ("stream_options without a stream", "completions", lambda m: good(m, stream_options={"include_usage": True}),
     "stream_options"),
    ("two lengths that disagree", "chat/completions", lambda m: chat(m, max_completion_tokens=9),
     "max_completion_tokens"),
]


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("what,route,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_400_naming_the_field(server, model, what, route, body, param):
    url, _ = server
    payload = body(model)
    sent = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    assert_error(httpx.post(f"{url}/v1/{route}", **sent, headers=KEY), 400, param)


def test_bad_bytes_are_400_and_the_server_answers_the_next_good_request(server, model):
    url, _ = server
    before = httpx.get(url + "/metrics", headers=KEY).text
    for raw in (b"{not json", "{\"model\": \"x\", \"prompt\": \"\xff\xfe\"}".encode("latin-1"), b"[1, 2]", b""):
        assert_error(httpx.post(url + "/v1/completions", content=raw, headers=KEY), 400)
    ok = httpx.post(url + "/v1/completions", json=good(model), headers=KEY)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    after = httpx.get(url + "/metrics", headers=KEY).text
    rejected = 'lopa_requests_total{status="rejected"}'
    assert metric(after, rejected) == metric(before, rejected) + 4
    assert httpx.get(url + "/health").status_code == 200


def test_every_lopa_setting_is_accepted_by_name(server, model):
    """k_policy and branch_m were refused before issue 24: the server's fields derive from DecodeConfig's."""
    body = good(model, strategy="lopa", k=2, k_policy="text", branch_confidence="top_m", branch_m=3)
    answer = httpx.post(f"{server[0]}/v1/completions", json=body, headers=KEY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["lopa"]["k"] == 2


def test_auth_is_401_without_the_right_key_and_health_stays_open(server, model):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        err = assert_error(httpx.post(url + "/v1/completions", json=good(model), headers=headers), 401)
        assert err["type"] == "authentication_error"
    assert_error(httpx.get(url + "/v1/models"), 401)
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_the_openai_client_raises_bad_request_for_lopa_fields(server, model):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model.path.name, prompt="x", max_tokens=4, extra_body={"tau": 0})
    assert info.value.body["param"] == "tau"
