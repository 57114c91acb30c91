"""Host time per decode step: the device path (engine/device.py) beside the host strategies, in one run (issue 26).

For each strategy (lopa k=7, d2f) and each n in --ns: the same n generated GSM8K-style problems through the
engine at max_num_seqs = n, once with RunnerConfig.device_step=False (today's host strategies) and once with
it on, each after a warm-up pass over the same problems (graphs captured, kernels compiled). Per decode step
in which all n requests run:

    wall ms      the engine step (StepInfo.seconds: forward, accept, commit, propose, bookkeeping)
    forward ms   the forward's own device time: CUDA events around each graph replay (the static path, the
                 default on a GPU: forward + batched predict); on the CPU the wall time of the eager forward
                 and its predictions
    host ms      wall - forward: what the step spends outside the forward's device time. On a GPU the device
                 path's step is ONE captured graph (forward + update + commit), so its forward column includes
                 the update's kernels and host ms is the host alone; on the host path host ms is the
                 strategies' Python, packing, splitting and the commit. On the CPU the device path's update
                 runs as eager ops and counts as host.

Throughput: tokens up to EOS / the engine's decode-step seconds (prefill apart), and its ratio to n = 1 of the
same mode. ``tokens_equal``: the two modes gave the same tokens for every request.

    PYTHONPATH=src python3 benchmarks/host_step.py --out benchmarks/results/host_step_h100
    PYTHONPATH=src python3 benchmarks/host_step.py --strategies d2f --out /tmp/d2f   # one strategy
    PYTHONPATH=src python3 benchmarks/host_step.py --tiny --out /tmp/x          # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lopa
from lopa.config import decode_config
from lopa.eval.tasks import gsm8k
from lopa.runner.model_runner import ModelRunner

from step_latency import git_commit

STRATEGIES = {"lopa k=7": dict(strategy="lopa", k=7), "d2f": dict(strategy="d2f")}
NAMES = {"lopa": "lopa k=7", "d2f": "d2f"}  # --strategies


class ForwardClock:
    """Device time of every forward of a step: CUDA events around graph replays (perf_counter around the eager
    forward on the CPU). Installed for the run; ``take()`` returns the ms since the last take."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.spans, self.cpu_ms = cuda, [], 0.0
        self._patches = []

    def _wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            if clock.cuda and torch.cuda.is_current_stream_capturing():
                return real(*args, **kwargs)
            if clock.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = real(*args, **kwargs)
                end.record()
                clock.spans.append((start, end))
                return out
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            clock.cpu_ms += 1e3 * (time.perf_counter() - t0)
            return out

        setattr(owner, name, timed)
        self._patches.append((owner, name, real))

    def __enter__(self):
        if self.cuda:  # the static path (the default on a GPU): forward + batched predict in one replay
            self._wrap(torch.cuda.CUDAGraph, "replay")
        else:  # eager: the host path's forward + per-request predict, the device path's forward + batched predict
            self._wrap(ModelRunner, "_eager")
            self._wrap(ModelRunner, "forward_packed")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._patches):
            setattr(owner, name, real)

    def take(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            ms = sum(s.elapsed_time(e) for s, e in self.spans)
        else:
            ms = self.cpu_ms
        self.spans, self.cpu_ms = [], 0.0
        return ms


def run_pass(model, prompts: list[str], config, clock: ForwardClock) -> dict:
    """Every prompt at once through the engine; per full decode step (all running): wall and forward ms."""
    engine = model.engine
    tok = model.tokenizer
    before = engine.counters.decode_s
    seqs = [engine.prepare(tok.encode(p), config) for p in prompts]
    for seq in seqs:
        engine.add(seq)
    results, walls, forwards = {}, [], []
    clock.take()
    while engine.has_work():
        outs = engine.step()
        forward_ms = clock.take()
        info = engine.last_step
        if info is not None and info.kind == "decode" and info.requests == len(prompts):
            walls.append(1e3 * info.seconds)
            forwards.append(forward_ms)
        for out in outs:
            if out.error is not None:
                raise out.error
            if out.finished:
                results[out.request_id] = out.result
    tokens = [results[s.id].token_ids for s in seqs]
    generated = sum(results[s.id].stats.generated_tokens for s in seqs)
    decode_s = engine.counters.decode_s - before
    hosts = [w - f for w, f in zip(walls, forwards)]
    return {"full_steps": len(walls), "wall_ms": statistics.median(walls), "forward_ms": statistics.median(forwards),
            "host_ms": statistics.median(hosts), "host_ms_mean": statistics.fmean(hosts),
            "tokens": generated, "tokens_per_s": generated / decode_s, "token_ids": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1,8,32,64", help="concurrent requests")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--strategies", default="lopa,d2f", help="lopa (k=7) and/or d2f")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_step"))
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    with contextlib.ExitStack() as stack:
        path = None
        if args.tiny:
            from lopa.models.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(stack.enter_context(tempfile.TemporaryDirectory()), model_type="dream")
            args.device = "cpu"
        rows, meta = measure(path, args, ns)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "host_step.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def measure(path, args, ns: list[int]) -> tuple[list[dict], dict]:
    problems = [p.prompt for p in gsm8k(None, max(ns))]
    rows = []
    meta = None
    for name in (NAMES[s] for s in args.strategies.split(",")):
        overrides = STRATEGIES[name]
        for n in ns:
            row = {"strategy": name, "n": n}
            for mode in ("host", "device"):
                runner = lopa.RunnerConfig(device=args.device, max_num_seqs=n, device_step=mode == "device")
                model = lopa.load_model(path, runner=runner)
                cuda = model.runner.device.type == "cuda"
                meta = meta or {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                                "model": "tiny" if args.tiny else "default", "dtype": str(model.runner.dtype),
                                "gen_length": args.gen_length, "commit": git_commit(), "torch": torch.__version__,
                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                config = decode_config(None, model.model_type, gen_length=args.gen_length, **overrides)
                with torch.inference_mode(), ForwardClock(cuda) as clock:
                    run_pass(model, problems[:n], config, clock)  # warm-up
                    r = run_pass(model, problems[:n], config, clock)
                row[mode] = r
                assert (model.engine.counters.device_steps > 0) == (mode == "device"), mode
                model.close()
                del model
                gc.collect()
            row["tokens_equal"] = row["host"].pop("token_ids") == row["device"].pop("token_ids")
            row["host_ms_ratio"] = row["host"]["host_ms"] / max(row["device"]["host_ms"], 1e-9)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        one = next((r for r in rows if r["strategy"] == row["strategy"] and r["n"] == 1), None)
        for mode in ("host", "device"):
            row[mode]["vs_n1"] = row[mode]["tokens_per_s"] / one[mode]["tokens_per_s"] if one else None
    return rows, meta


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Host time per decode step, {meta['model']} model on {meta['device']} ({meta['dtype']}, gen_length "
             f"{meta['gen_length']}, commit {meta['commit']}, {meta['date']}). Medians over the steps in which all n "
             "requests ran; host = wall - forward. tok/s: tokens up to EOS / decode-step seconds; xN1: against n = 1 "
             "of the same path.", "",
             "| strategy | n | host path: wall / forward / host ms | device path: wall / forward / host ms | host ms "
             "ratio | host path tok/s (xN1) | device path tok/s (xN1) | tokens equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, d = r["host"], r["device"]
        cell = lambda x: f"{x['wall_ms']:.2f} / {x['forward_ms']:.2f} / {x['host_ms']:.2f}"  # noqa: E731
        tps = lambda x: f"{x['tokens_per_s']:.0f}" + (f" ({x['vs_n1']:.1f}x)" if x["vs_n1"] else "")  # noqa: E731
        lines.append(f"| {r['strategy']} | {r['n']} | {cell(h)} | {cell(d)} | {r['host_ms_ratio']:.1f} | {tps(h)} | "
                     f"{tps(d)} | {r['tokens_equal']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
