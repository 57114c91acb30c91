"""One request must never take the server down: what the engine cannot hold is refused with 400 before it queues,
an out-of-memory step fails only its requests, and memory returns to where it was after large requests."""

import logging
import os
import threading

import httpx
import openai
import pytest
import torch

import lopa

from .conftest import serving
from .fakes import Gated

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
NORMAL = dict(strategy="lopa", k=3, block_size=8)


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def test_a_huge_k_is_refused_with_400_naming_k_and_the_server_stays_healthy(client, server, model):
    for k in (100000, 1000):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=400, extra_body={"k": k})
        error = err.value.body
        assert error["param"] == "k" and f"k: {k} lookaheads" in error["message"]
        assert "64 (RunnerConfig.max_lookahead)" in error["message"]
    with pytest.raises(openai.BadRequestError, match="max_num_batched_tokens"):  # 21 rows x 400 columns > 8192
        client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=400, extra_body={"k": 20})
    assert model.runner.pool is None  # nothing was allocated for them
    ok = client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=NORMAL)
    assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens > 0
    assert httpx.get(server[0] + "/health").status_code == 200


def test_an_out_of_memory_step_fails_its_request_and_the_server_goes_on(client, server, model, monkeypatch):
    real, calls = model.runner.execute, []

    def execute(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 327.00 GiB (injected)")
        return real(items)

    monkeypatch.setattr(model.runner, "execute", execute)
    with pytest.raises(openai.InternalServerError, match="ran out of memory"):
        client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=NORMAL)
    assert httpx.get(server[0] + "/health").status_code == 200
    ok = client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=NORMAL)
    assert ok.usage.completion_tokens > 0 and len(calls) > 1


def test_memory_returns_after_a_burst_of_large_valid_requests(client, server, model):
    """Four concurrent requests at k = 31 over 256 positions (32 x 256 = 8192 query positions at most, the
    default bound) reserve up to 4 slots of ~8.5k KV positions (~70 MB each); the idle server gives the pool
    back. Small blocks keep the windows (and the compute) small."""
    client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=32, extra_body=NORMAL)  # warm
    before = rss_bytes()
    large = dict(strategy="lopa", k=31, block_size=4)
    answers = []

    def ask():
        answers.append(client.completions.create(model=model.path.name, prompt=PROMPT, max_tokens=256,
                                                 extra_body=large))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 4 and all(a.usage.completion_tokens > 0 for a in answers)
    peak = model.runner.peak_bytes
    assert peak >= model.runner.slot_bytes(8192)  # the burst really held a large pool
    assert model.runner.pool is None  # the pool's bytes are back to zero
    grown = rss_bytes() - before
    assert grown < peak / 2, f"RSS grew by {grown / 2**20:.0f} MiB after the burst (pool peak {peak / 2**20:.0f} MiB)"
    assert httpx.get(server[0] + "/health").status_code == 200


def test_an_engine_that_cannot_go_on_says_why_in_the_log_and_in_health(model, caplog):
    gated = Gated(model.engine)
    gated.fail_next = True  # a step failure that is not out of memory: the engine stops
    with caplog.at_level(logging.ERROR, logger="lopa.serve"), serving(model, engine=gated) as (url, _app):
        assert httpx.post(url + "/v1/completions", json={"model": model.path.name, "prompt": PROMPT, "max_tokens": 8,
                                                         "block_size": 8}).status_code == 503
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
    (record,) = [r for r in caplog.records if r.name == "lopa.serve"]
    assert "the engine stopped" in record.getMessage() and "device lost" in str(record.exc_info[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_real_cuda_out_of_memory_fails_its_request_and_the_server_goes_on():
    """On a GPU with CUDA graphs: the device capped just above what the model holds, a request whose KV slot
    (~1000 x 400 positions, ~1.6 GB in bf16) cannot be allocated fails with 500; the next one is answered."""
    model = lopa.load_model(runner=lopa.RunnerConfig(device="cuda", max_num_seqs=4, max_lookahead=4096,
                                                     max_num_batched_tokens=1 << 22, kv_cache_bytes=1 << 40))
    body = {"model": model.path.name, "prompt": PROMPT, "max_tokens": 32, **NORMAL}
    total = torch.cuda.get_device_properties(model.runner.device).total_memory
    try:
        with serving(model) as (url, _app):
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200  # graphs captured
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (256 << 20)) / total)
            big = httpx.post(url + "/v1/completions", timeout=120, json={**body, "max_tokens": 400, "k": 1000})
            assert big.status_code == 500 and "ran out of memory" in big.json()["error"]["message"], big.text
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
            assert httpx.get(url + "/health").status_code == 200
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        model.close()
