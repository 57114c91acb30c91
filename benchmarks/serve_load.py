"""`lopa serve` under load: throughput and latency against concurrency, with generate_many as the ceiling.

The server runs in its own process (`python -m lopa serve`, the default model) and the clients are asyncio
tasks in this one, so the server's event loop and engine thread do not share a GIL with the load. Each
concurrency level c runs N = max(min_requests, waves·c) GSM8K-style prompts (waves = 4) (lopa's generated test split):
c clients each send one streaming request at a time (stream_options.include_usage) until all N are done.
Per request: time to first block (first chunk carrying text) and to the last token. Throughput:
requests/s and generated tokens/s over the level's wall time (tokens = usage.completion_tokens: up to and
including the first EOS). The ceiling for level c: the same N prompts through ``lopa.generate_many`` on a
model loaded with max_num_seqs = c, in this process, with no server (tokens/s over the wall time of its
second pass; the first warms up). The server gets a warm-up of 8 requests before the levels.

    PYTHONPATH=src python3 benchmarks/serve_load.py --out benchmarks/results/serve_cpu     # writes serve_load.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def engine_steps(url: str) -> dict:
    """The server's own step counters from /metrics: steps and their wall seconds by kind (prefill / decode)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for kind in ("prefill", "decode"):
        for stat in ("count", "sum"):
            key = f'lopa_step_seconds_{stat}{{kind="{kind}"}} '
            line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
            out[f"{kind}_{stat}"] = float(line.rsplit(" ", 1)[1]) if line else 0.0
    return out


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    text, usage = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - t0
                text.append(choice["text"])
    last = time.perf_counter() - t0
    return {"first_block_s": first if first is not None else last, "last_token_s": last,
            "tokens": usage["completion_tokens"], "decode_forwards": usage["decode_forwards"], "text": "".join(text)}


async def load_level(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    todo = list(enumerate(bodies))
    results: list[dict | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client() -> None:
            while todo:
                i, body = todo.pop(0)
                results[i] = await one_request(http, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lopa", "serve", "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(max(args.concurrency)), "--max-pending", str(10 * max(args.concurrency)),
           "--served-model-name", "bench"]
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "server_log.txt", "wb")  # a file, not a pipe: a pipe nobody drains blocks the server
    server = subprocess.Popen(cmd, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 300
    tail = lambda: (args.out / "server_log.txt").read_bytes()[-2000:].decode(errors="replace")  # noqa: E731
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"lopa serve exited: {tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"lopa serve did not come up in 300 s: {tail()}")


def ceiling(args, prompts: list[str], concurrency: int, settings: dict) -> dict:
    """The same prompts through lopa.generate_many with max_num_seqs = concurrency: tokens/s, requests/s."""
    import lopa

    model = lopa.load_model(runner=lopa.RunnerConfig(device=args.device, max_num_seqs=concurrency))
    config = lopa.decode_config(None, model.model_type, **settings)
    lopa.generate_many(model, prompts, config)  # warm-up: the same shapes the timed pass meets
    before = dataclasses.replace(model.engine.counters)
    t0 = time.perf_counter()
    results = lopa.generate_many(model, prompts, config)
    wall = time.perf_counter() - t0
    after = model.engine.counters
    decode_steps = after.decode_steps - before.decode_steps
    tokens = sum(r.stats.generated_tokens for r in results)
    close = getattr(model, "close", None)
    if close is not None:
        close()
    return {"tokens_per_s": tokens / wall, "requests_per_s": len(prompts) / wall, "wall_s": wall,
            "tokens": tokens, "texts": [r.text for r in results], "decode_steps": decode_steps,
            "prefill_steps": after.prefill_steps - before.prefill_steps,
            "decode_step_ms": 1e3 * (after.decode_s - before.decode_s) / max(1, decode_steps)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device']} ({meta['threads']} torch threads); commit {meta['commit']}; {meta['date']}; "
             f"settings {meta['settings']}.",
             "", "| concurrency | requests | req/s | tok/s | first block p50 / p99 | last token p50 / p99 | "
             "generate_many tok/s | server / generate_many | tok/s vs c=1 | answers equal generate_many | "
             "engine busy | decode / prefill steps (generate_many) | ms per decode step (generate_many) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ceil = f"{r['ceiling_tokens_per_s']:.0f} | {r['vs_ceiling']:.0%}" if r["vs_ceiling"] else "- | -"
        equal = f"{r['equal_to_ceiling']}/{r['requests']}" if r["equal_to_ceiling"] is not None else "-"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['first_block_p50_s'] * 1e3:.0f} / {r['first_block_p99_s'] * 1e3:.0f} ms | "
                     f"{r['last_token_p50_s'] * 1e3:.0f} / {r['last_token_p99_s'] * 1e3:.0f} ms | "
                     f"{ceil} | {r['vs_c1']:.1f}x | {equal} | {r['engine_busy']:.0%} | "
                     f"{r['decode_steps']} / {r['prefill_steps']} ({r['ceiling_decode_steps'] or '-'} / "
                     f"{r['ceiling_prefill_steps'] or '-'}) | {r['decode_step_ms']:.2f} "
                     f"({r['ceiling_decode_step_ms'] or 0:.2f}) |")
    return "\n".join(lines) + "\n"


def metadata(args, settings: dict) -> dict:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    return {"device": device, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "counting": "tokens = usage.completion_tokens (up to and including the first EOS); first block = "
                        "first SSE chunk with text; rates over each level's wall time"}


def write(args, rows: list[dict], settings: dict) -> None:
    """JSON + Markdown of the levels measured so far (written after each, so a cut-off run keeps its rows)."""
    for r in rows:
        r["vs_ceiling"] = r["tokens_per_s"] / r["ceiling_tokens_per_s"] if r["ceiling_tokens_per_s"] else None
        r["vs_c1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    meta = metadata(args, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "serve_load.md").write_text(markdown(rows, meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--waves", type=int, default=4, help="N = max(min_requests, waves * concurrency)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--strategy", default="lopa")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="also time generate_many on the same prompts (--no-ceiling: the server only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in both processes (default: "
                    "torch's); 1 on a CPU shared with other work, where spinning OpenMP threads cost most")
    args = ap.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process reads it at start
    from lopa.eval.tasks import gsm8k

    settings = {"strategy": args.strategy, "k": args.k, "gen_length": args.gen_length}
    n_max = max(args.min_requests, args.waves * max(args.concurrency))
    prompts = [p.prompt for p in gsm8k(None, n_max)]
    ceilings = {}
    for c in args.concurrency if args.ceiling else []:
        ceilings[c] = ceiling(args, prompts[:max(args.min_requests, args.waves * c)], c, settings)
        print(f"generate_many, max_num_seqs {c}: {ceilings[c]['tokens_per_s']:.0f} tok/s", flush=True)

    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        body = lambda p: {"model": "bench", "prompt": p, "max_tokens": args.gen_length, "strategy": args.strategy,  # noqa: E731
                          "k": args.k, "stream": True, "stream_options": {"include_usage": True}}
        for c in args.concurrency:  # warm-up: every level once, so the timed pass meets shapes the server has seen
            asyncio.run(load_level(url, [body(p) for p in prompts[:max(args.min_requests, args.waves * c)]], c))
        for c in args.concurrency:
            n = max(args.min_requests, args.waves * c)
            before = engine_steps(url)
            results, wall = asyncio.run(load_level(url, [body(p) for p in prompts[:n]], c))
            steps = {k: v - before[k] for k, v in engine_steps(url).items()}
            first = [r["first_block_s"] for r in results]
            last = [r["last_token_s"] for r in results]
            tokens = sum(r["tokens"] for r in results)
            ceil = ceilings.get(c, {"tokens_per_s": None, "requests_per_s": None, "texts": []})
            equal = sum(r["text"] == t for r, t in zip(results, ceil["texts"])) if c in ceilings else None
            print(f"server, concurrency {c}: {tokens / wall:.0f} tok/s, {n / wall:.2f} req/s", flush=True)
            rows.append({"concurrency": c, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
                         "tokens": tokens, "tokens_per_s": tokens / wall,
                         "first_block_p50_s": percentile(first, 50), "first_block_p99_s": percentile(first, 99),
                         "last_token_p50_s": percentile(last, 50), "last_token_p99_s": percentile(last, 99),
                         "ceiling_tokens_per_s": ceil["tokens_per_s"],
                         "ceiling_requests_per_s": ceil["requests_per_s"], "equal_to_ceiling": equal,
                         "decode_steps": int(steps["decode_count"]), "prefill_steps": int(steps["prefill_count"]),
                         "engine_busy": (steps["decode_sum"] + steps["prefill_sum"]) / wall,
                         "decode_step_ms": 1e3 * steps["decode_sum"] / max(1, steps["decode_count"]),
                         "ceiling_decode_steps": ceil.get("decode_steps"), "ceiling_prefill_steps": ceil.get("prefill_steps"),
                         "ceiling_decode_step_ms": ceil.get("decode_step_ms")})
            write(args, rows, settings)
    finally:
        server.terminate()
        server.wait(60)
    print(markdown(rows, metadata(args, settings)))


if __name__ == "__main__":
    main()
