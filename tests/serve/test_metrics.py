"""The start-up gauges of /metrics report the engine's counters (issue 25: nothing captures, compiles or runs
eagerly after start-up; what does is counted)."""

from prometheus_client import generate_latest

from lopa.engine.engine import EngineCounters
from lopa.serve.metrics import Metrics

GAUGES = {"lopa_graph_captures_after_startup": "captures_after_start",
          "lopa_recompiles_after_startup": "recompiles_after_start",
          "lopa_eager_decode_steps": "eager_decode_steps", "lopa_eager_prefill_steps": "eager_prefill_steps",
          "lopa_device_decode_steps": "device_steps", "lopa_flat_decode_steps": "flat_steps",
          "lopa_partial_decode_steps": "partial_steps",
          "lopa_deferred_requests": "deferred_requests"}


def test_startup_gauges_follow_the_engine_counters():
    metrics, counters = Metrics(), EngineCounters()
    for i, field in enumerate(GAUGES.values(), 1):
        setattr(counters, field, 10 * i)
    metrics.on_step(None, running=0, waiting=0, in_flight=0, counters=counters)
    lines = generate_latest(metrics.registry).decode().splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}
    assert {name: values[name] for name in GAUGES} == {name: 10.0 * i for i, name in enumerate(GAUGES, 1)}
