"""Prometheus metrics of one server: one CollectorRegistry per app (tests build several apps).

Updated in the event loop from RequestOutputs and each step's StepInfo; the engine only returns numbers.
Counting as everywhere in lopa: generated tokens up to and including the first EOS; one engine step is one
forward however many requests and branch rows it holds; prefill steps are counted apart by kind.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPF_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lopa_requests", "Requests by outcome: ok (answered in full), cancelled (client "
                                "went away or timed out), error (engine failure), rejected (429 or 4xx)",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("lopa_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("lopa_generated_tokens", "Generated tokens of finished requests, up to "
                                        "and including the first EOS", registry=r)
        self.steps = Counter("lopa_engine_steps", "Engine steps = forward passes (one per step however many "
                             "requests and branch rows it holds), by kind", ["kind"], registry=r)
        self.decode_forwards = Counter("lopa_decode_forwards", "Sum over finished requests of the decode "
                                       "forwards each took part in", registry=r)
        self.branch_rows = Counter("lopa_branch_rows", "Sum over decode steps of the branch rows in each (all "
                                   "requests together)", registry=r)
        self.running = Gauge("lopa_requests_running", "Requests in the running batch (each holds a KV slot)",
                             registry=r)
        self.waiting = Gauge("lopa_requests_waiting", "Requests queued in the engine, not yet admitted", registry=r)
        self.in_flight = Gauge("lopa_requests_in_flight", "Requests submitted and not yet finished (the bound "
                               "behind 429)", registry=r)
        self.step_s = Histogram("lopa_step_seconds", "Wall time of one engine step", ["kind"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.first_block_s = Histogram("lopa_time_to_first_block_seconds", "Streamed requests only: admission "
                                       "to the first settled block of generated ids (the whole answer if it "
                                       "settles at once); its text may reach the client later when held back "
                                       "at a possible stop string", buckets=LATENCY_BUCKETS, registry=r)
        self.request_s = Histogram("lopa_request_seconds", "Admission to the last token (answered requests)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tpf = Histogram("lopa_request_tpf", "Tokens per decode forward of each finished request",
                             buckets=TPF_BUCKETS, registry=r)
        self.captures = Gauge("lopa_graph_captures_after_startup", "CUDA graphs captured while serving (0 once the "
                              "start-up warm-up covers every shape)", registry=r)
        self.recompiles = Gauge("lopa_recompiles_after_startup", "torch.compile graphs compiled since start-up",
                                registry=r)
        self.eager_steps = Gauge("lopa_eager_decode_steps", "Greedy decode steps run eagerly because their shape "
                                 "was not captured at start-up", registry=r)
        self.eager_prefills = Gauge("lopa_eager_prefill_steps", "Prefill steps run eagerly with exact shapes because "
                                    "no start-up shape held them (a prompt past the largest warmed query bucket)",
                                    registry=r)
        self.device_steps = Gauge("lopa_device_decode_steps", "Decode steps that iterated every request at once on "
                                  "the device (RunnerConfig.device_step)", registry=r)
        self.flat_steps = Gauge("lopa_flat_decode_steps", "Device-path decode steps whose forward ran over the "
                                "requests' real queries, not padded to the widest one's (RunnerConfig.flat_queries)",
                                registry=r)
        self.partial_steps = Gauge("lopa_partial_decode_steps", "Decode steps that ran only part of the running "
                                   "requests (all of them together had no shape captured at start-up: the step "
                                   "budget, max_num_batched_tokens); the others waited, first in line for the "
                                   "next", registry=r)
        self.deferred = Gauge("lopa_deferred_requests", "Requests the partial decode steps left waiting, summed over "
                              "those steps", registry=r)
        for status in ("ok", "cancelled", "error", "rejected"):
            self.requests.labels(status)  # every outcome shows from the start, at 0

    def on_step(self, step, running: int, waiting: int, in_flight: int, counters=None) -> None:
        """step: StepInfo(kind, requests, rows, seconds) of the latest engine step, or None; counters: the
        engine's EngineCounters."""
        if counters is not None:
            self.captures.set(counters.captures_after_start)
            self.recompiles.set(counters.recompiles_after_start)
            self.eager_steps.set(counters.eager_decode_steps)
            self.eager_prefills.set(counters.eager_prefill_steps)
            self.device_steps.set(counters.device_steps)
            self.flat_steps.set(counters.flat_steps)
            self.partial_steps.set(counters.partial_steps)
            self.deferred.set(counters.deferred_requests)
        self.running.set(running)
        self.waiting.set(waiting)
        self.in_flight.set(in_flight)
        if step is not None:
            self.steps.labels(step.kind).inc()
            self.step_s.labels(step.kind).observe(step.seconds)
            if step.kind == "decode":
                self.branch_rows.inc(step.rows)

    def on_finished(self, stats, seconds: float) -> None:
        self.generated_tokens.inc(stats.generated_tokens)
        self.decode_forwards.inc(stats.decode_forwards)
        self.tpf.observe(stats.tpf)
        self.request_s.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
