"""What `lopa serve`'s HTTP side costs a request, without the model: uvicorn's event loop and HTTP parser variants.

Each variant ("LOOP:HTTP", uvicorn's ``loop`` and ``http`` settings: asyncio or uvloop, h11 or httptools) serves
the app of `lopa serve` (serve/app.py: auth, validation, tokenization, the engine thread, SSE chunks, metrics) in
its own process, over the stand-in engine of the server tests (tests/serve/fakes.py: each step hands every running
request its next block of ids, no model work), so what is timed is the HTTP side alone. The clients (serve_load.py's:
httpx, asyncio, streaming completions with usage) live in this process. Per level c: requests/s, latency p50 /
p99, and the server process's CPU milliseconds per request (Linux /proc: its event loop, engine thread and HTTP
parsing together). Ratios against the first variant, measured in the same run.

    PYTHONPATH=src python3 benchmarks/http_overhead.py --out benchmarks/results/http_overhead
    PYTHONPATH=src python3 benchmarks/http_overhead.py --requests 20 --levels 1,4 --out /tmp/h    # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(port: int, loop: str, http: str) -> None:
    """The server process: the default model's tokenizer and settings, the stand-in engine, uvicorn."""
    import torch
    import uvicorn

    import lopa
    from lopa.config import ServeConfig
    from lopa.serve import create_app

    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from fakes import FakeEngine  # the server tests' stand-in engine: no model work

    torch.set_num_threads(1)
    model = lopa.load_model(runner=lopa.RunnerConfig(device="cpu"))
    app = create_app(model, ServeConfig(served_model_name="bench"), engine=FakeEngine())
    uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http=http, log_level="warning")


def run_variant(args, variant: str) -> list[dict]:
    import httpx
    from serve_load import cpu_seconds, free_port, load_level  # its clients, its server CPU, its ports

    loop, http = variant.split(":")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), loop, http], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the server did not start")
            time.sleep(0.1)
        body = {"model": "bench", "prompt": "Question: Tom has 3 apples and buys 5 more. How many now?\nAnswer:",
                "max_tokens": args.max_tokens, "block_size": args.block_size, "stream": True,
                "stream_options": {"include_usage": True}}
        asyncio.run(load_level(url, [body] * max(4, args.requests // 10), 1))  # connections, imports, first calls
        rows = []
        for c in args.levels:
            before = cpu_seconds(server.pid)["process_cpu_s"]
            results, wall = asyncio.run(load_level(url, [body] * args.requests, c))
            cpu = cpu_seconds(server.pid)["process_cpu_s"] - before
            lat = sorted(r["last_token_s"] for r in results)
            rows.append({"variant": variant, "concurrency": c, "requests": args.requests,
                         "requests_per_s": args.requests / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
                         "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                         "server_cpu_ms_per_request": 1e3 * cpu / args.requests})
            print(f"{variant} c={c}: {rows[-1]['requests_per_s']:.0f} req/s, server CPU "
                  f"{rows[-1]['server_cpu_ms_per_request']:.2f} ms a request", flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(30)


def markdown(meta: dict, rows: list[dict]) -> str:
    base: dict[int, dict] = {}
    for r in rows:  # the first variant's first run of each level (a variant may be named twice)
        if r["variant"] == rows[0]["variant"]:
            base.setdefault(r["concurrency"], r)
    lines = [f"HTTP side of `lopa serve` per request, stand-in engine (no model), {meta['cpus']} CPUs, python "
             f"{meta['python']}, commit {meta['commit']}, {meta['date']}; {meta['requests']} streaming completions "
             f"of {meta['max_tokens']} tokens in blocks of {meta['block_size']} per level. Ratios: against "
             f"{rows[0]['variant']} at the same c.", "",
             "| loop:http | c | req/s (ratio) | p50 / p99 ms | server CPU ms a request (ratio) |",
             "|---|---|---|---|---|"]
    for r in rows:
        b = base[r["concurrency"]]
        cpu, cpu0 = r["server_cpu_ms_per_request"], b["server_cpu_ms_per_request"]
        ratio = f"{cpu / cpu0:.2f}x" if cpu0 else "n/a"  # /proc counts clock ticks (10 ms): a short run may read 0
        lines.append(f"| {r['variant']} | {r['concurrency']} | {r['requests_per_s']:.0f} "
                     f"({r['requests_per_s'] / b['requests_per_s']:.2f}x) | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
                     f"{cpu:.2f} ({ratio}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="asyncio:h11,uvloop:httptools,asyncio:httptools",
                    help="comma-separated LOOP:HTTP pairs (uvicorn's loop and http settings)")
    ap.add_argument("--levels", default="1,16", help="concurrent clients")
    ap.add_argument("--requests", type=int, default=300, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16, help="ids per step of the stand-in engine (SSE chunks)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/http_overhead"))
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "LOOP", "HTTP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return
    args.levels = [int(c) for c in args.levels.split(",")]
    sys.path.insert(0, str(Path(__file__).parent))
    from step_latency import git_commit

    meta = {"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "cpus": os.cpu_count(), "requests": args.requests,
            "max_tokens": args.max_tokens, "block_size": args.block_size}
    rows = [row for variant in args.variants.split(",") for row in run_variant(args, variant)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "http_overhead.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
