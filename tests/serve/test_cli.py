"""`lopa serve` through typer's CliRunner: flags reach the app; bad values are one line and exit 2."""

import httpx
from typer.testing import CliRunner

import lopa.serve
from lopa.cli import app
from lopa.serve import BackgroundServer

from .conftest import metric


def test_bad_serve_flags_exit_2_with_one_line():
    for flags, field in ((["--max-pending", "0"], "max_pending"), (["--port", "0"], "port"),
                         (["--request-timeout", "-1"], "request_timeout_s"),
                         (["--kv-cache-bytes", "0"], "kv_cache_bytes"),
                         (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
                         (["--attention", "dense"], "attention"), (["--key-splits", "0"], "key_splits"),
                         (["--device-step-min", "0"], "device_step_min")):
        result = CliRunner().invoke(app, ["serve", *flags])
        assert result.exit_code == 2, result.output
        assert field in result.output and "Traceback" not in result.output


def test_serve_builds_an_app_with_the_flags_and_the_env_api_key(monkeypatch):
    seen = {}

    def fake_serve(asgi_app, host, port):  # instead of blocking in uvicorn: serve it in a thread, try it
        seen["where"] = (host, port)
        with BackgroundServer(asgi_app) as url:
            seen["no key"] = httpx.get(url + "/v1/models").status_code
            seen["models"] = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key"}).json()
            seen["k 9"] = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer env-key"},
                                     json={"model": "tiny-lopa", "prompt": "Hi", "max_tokens": 8, "k": 9})

    monkeypatch.setattr(lopa.serve, "serve", fake_serve)
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--port", "8123", "--max-num-seqs", "4",
                                      "--served-model-name", "tiny-lopa", "--max-lookahead", "8"],
                              env={"LOPA_API_KEY": "env-key"})
    assert result.exit_code == 0, result.output
    assert seen["where"] == ("127.0.0.1", 8123) and seen["no key"] == 401
    assert [m["id"] for m in seen["models"]["data"]] == ["tiny-lopa"]
    assert seen["k 9"].status_code == 400 and "ceiling of 8" in seen["k 9"].json()["error"]["message"]


def test_device_step_flag_reaches_the_engine_and_metrics(monkeypatch):
    """--device-step: greedy lopa requests decode on the device path, counted in /metrics; without it, none do, nor
    with --device-step-min 2 for one request at a time."""
    seen = {}

    def fake_serve(asgi_app, host, port):
        with BackgroundServer(asgi_app) as url:
            answer = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 8,
                                                                "strategy": "lopa", "k": 2})
            seen["status"] = answer.status_code
            seen["device steps"] = metric(httpx.get(url + "/metrics").text, "lopa_device_decode_steps")

    monkeypatch.setattr(lopa.serve, "serve", fake_serve)
    for flags, on in (([], False), (["--device-step"], True), (["--device-step", "--device-step-min", "2"], False)):
        result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--served-model-name", "m",
                                          "--metrics-public", *flags])
        assert result.exit_code == 0 and seen["status"] == 200, result.output
        assert (seen["device steps"] > 0) == on, (flags, seen)


def test_compile_update_and_key_splits_flags_reach_the_runner_config(monkeypatch):
    """--compile-update / --no-compile-update: RunnerConfig.compile_update on / off (the device path's update eager,
    a shorter first start); neither: None, the model's size decides (config.compiles_update). --key-splits N:
    RunnerConfig.key_splits (default None: by the GPU's size). --flat-queries / --no-flat-queries:
    RunnerConfig.flat_queries (default off)."""
    import lopa.api

    seen = []

    def fake_load(path, adapter=None, runner=None):
        seen.append((runner.compile_update, runner.key_splits, runner.flat_queries))
        raise lopa.ConfigError("stop here")

    monkeypatch.setattr(lopa.api, "load_model", fake_load)
    for flags in ([], ["--compile-update", "--flat-queries"], ["--no-compile-update", "--key-splits", "4",
                                                                "--no-flat-queries"]):
        result = CliRunner().invoke(app, ["serve", "--device", "cpu", *flags])
        assert "stop here" in result.output and "Traceback" not in result.output, result.output
    assert seen == [(None, None, False), (True, None, True), (False, 4, False)]
