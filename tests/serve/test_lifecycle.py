"""Cancellation, the queue bound, the per-request time limit, engine death and shutdown, over real HTTP."""

import sys
import threading
import time

import httpx
import pytest

from lopa.serve.server import _config

from .conftest import metric, serving
from .fakes import Gated


def body(model, **extra):
    return {"model": model.path.name, "prompt": "Question: 2 + 2?\nAnswer:", "max_tokens": 16, "block_size": 8,
            **extra}


def wait_for(condition, what: str, limit_s: float = 20.0) -> None:
    """Poll until ``condition()`` holds (the deadline only bounds a hang; nothing here is timed)."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for: {what}"
        time.sleep(0.01)


def test_closing_a_stream_after_the_first_chunk_aborts_the_request_and_frees_its_slot(model):
    with serving(model) as (url, app):
        core, engine = app.state.core, model.engine
        long = body(model, max_tokens=400, block_size=4, stream=True, strategy="threshold")
        with httpx.stream("POST", url + "/v1/completions", json=long) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: {")
        wait_for(lambda: core.pending == 0, "the aborted request to leave")
        assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.has_work()
        assert model.runner.pool is None, "the idle engine still holds its KV pool"
        text = httpx.get(url + "/metrics").text
        assert metric(text, 'lopa_requests_total{status="cancelled"}') == 1
        assert metric(text, 'lopa_requests_total{status="ok"}') == 0
        assert httpx.post(url + "/v1/completions", json=body(model)).status_code == 200  # and it still serves


def test_a_full_queue_answers_429_with_retry_after_then_serves_again(model):
    gated = Gated(model.engine)
    gated.gate.clear()  # the engine is held inside its first step: nothing finishes
    with serving(model, engine=gated, max_pending=2) as (url, app):
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(httpx.post(url + "/v1/completions",
                                                                              json=body(model), timeout=60)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: app.state.core.pending == 2, "two requests in flight")
        full = httpx.post(url + "/v1/completions", json=body(model))
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        gated.gate.set()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200, 200]
        assert httpx.post(url + "/v1/completions", json=body(model)).status_code == 200


def test_a_request_past_its_time_limit_is_aborted_with_504(model):
    gated = Gated(model.engine)
    gated.gate.clear()
    with serving(model, engine=gated, request_timeout_s=0.2) as (url, app):
        late = httpx.post(url + "/v1/completions", json=body(model), timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        gated.gate.set()
        wait_for(lambda: app.state.core.pending == 0, "the timed-out request to be aborted")
        assert not model.engine.has_work()


def test_engine_death_fails_waiters_with_503_and_turns_health_503(model):
    gated = Gated(model.engine)
    gated.fail_next = True
    with serving(model, engine=gated) as (url, app):
        dead = httpx.post(url + "/v1/completions", json=body(model), timeout=60)
        assert dead.status_code == 503 and "device lost" in dead.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.post(url + "/v1/completions", json=body(model)).status_code == 503
        streamed = httpx.post(url + "/v1/completions", json=body(model, stream=True))
        assert streamed.status_code == 503
        assert metric(httpx.get(url + "/metrics").text, 'lopa_requests_total{status="error"}') >= 1
    assert not model.engine.has_work() and model.runner.pool is None  # fail_all emptied it and gave the pool back


def test_a_request_whose_strategy_fails_gets_500_and_the_server_goes_on(model):
    gated = Gated(model.engine)
    with serving(model, engine=gated) as (url, app):
        for stream in (False, True):
            gated.poison = True
            failed = httpx.post(url + "/v1/completions", json=body(model, stream=stream), timeout=60)
            if stream:  # the stream had started (200): it ends in an error event, not in [DONE]
                assert failed.status_code == 200 and "[DONE]" not in failed.text
                assert '"code": "request_failed"' in failed.text
            else:
                assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
            assert "strategy bug" in failed.text
            assert httpx.post(url + "/v1/completions", json=body(model)).status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert metric(httpx.get(url + "/metrics").text, 'lopa_requests_total{status="error"}') == 2
    assert not model.engine.has_work()


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")
def test_the_server_runs_on_uvicorns_c_parser_and_event_loop(model):
    """The serve extra installs httptools and uvloop, and the server leaves uvicorn's choice on "auto", so requests
    are parsed by httptools on a uvloop event loop (the engine loop's deliveries arrive on it too)."""
    import uvloop

    with serving(model) as (url, app):
        assert httpx.get(url + "/health").status_code == 200
        assert isinstance(app.state.core.loop, uvloop.Loop), type(app.state.core.loop)
    config = _config(app, "127.0.0.1", 0, 1, "warning")  # what `lopa serve` and BackgroundServer run
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol", config.http_protocol_class
