"""`lopa serve` under load, from a freshly started server: cold and warm rounds against concurrency, per variant.

Per server variant (``--variants``; each a set of `lopa serve` flags, its RunnerConfig fields in VARIANTS):
start `python -m lopa serve` (the default model, ``--max-num-seqs`` = the largest level) in its own process and
time it from process start to the first /health 200 (start-up: loading, compiling and, with the warm-up, every
CUDA graph). Round 0 ("cold") is the first traffic the server sees, no warm-up requests before it: every level
c in turn; the later rounds ("warm") repeat the same requests. A level: N = max(min_requests, waves·c)
GSM8K-style prompts (lopa's generated test split), c asyncio clients each keeping one streaming request
(stream_options.include_usage) in flight. Per request: time to first block (first chunk carrying text) and to
the last token; per level: requests/s and generated tokens/s over its wall time (tokens =
usage.completion_tokens: up to and including the first EOS), and the server's /metrics before and after it
(engine steps and their seconds, CUDA-graph captures, torch.compile recompiles, eager and device-path decode
steps, the step budget's partial decode steps), and the server's CPU seconds over the level's wall time: its
main thread (the event loop, which shares the GIL with the engine thread) and the whole process (Linux). The
clients live in this process, the server in its own, so they share no GIL with it.

The ceiling of level c (``--ceiling``): the same N prompts through ``lopa.generate_many`` in this process, no
server, on one model per variant loaded with the server's engine settings (max_num_seqs = the largest level,
the variant's attention and device_step) but without the start-up warm-up, admitting at most c requests at a
time (what the server's c clients do); its first pass warms the shapes up, the second is timed.

Ratios in the table: each level's tokens/s over its own round's smallest level (issue 26: c=16 >= 8x c=1),
the server over generate_many at the same c (issue 26: >= 0.85 warm; issue 25: >= 0.8 and c=16 >= 3x c=1
from the cold round).

    PYTHONPATH=src python3 benchmarks/serve_load.py --out benchmarks/results/serve   # writes serve_load.{json,md}
    ... --variants host,device,lazy --server-arg=--step-rows=256                    # flags added to every server
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import getpass
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# RunnerConfig fields of each variant (the server gets them as flags, the ceiling as RunnerConfig)
VARIANTS = {
    "host": {"device_step": False},  # the warm-up on a GPU (flex attention), the host strategies
    "device": {"device_step": True},  # every decode step iterates all its requests at once on the device
    "auto": {},  # the defaults: with the warm-up on a GPU the device path, its update compiled, for every step
    "lazy": {"warmup": False},  # no warm-up: sdpa, each shape captured on first use (the default before it)
}
FLAGS = {"warmup": lambda v: "--warmup" if v else "--no-warmup",
         "device_step": lambda v: "--device-step" if v else "--no-device-step",
         "attention": lambda v: f"--attention={v}"}
GAUGES = {"captures": "lopa_graph_captures_after_startup", "recompiles": "lopa_recompiles_after_startup",
          "eager_steps": "lopa_eager_decode_steps", "device_steps": "lopa_device_decode_steps",
          "partial_steps": "lopa_partial_decode_steps"}
WARMUP_LOG = re.compile(r"warm-up captured (\d+) CUDA graphs(?: \([^)]*\))? in ([\d.]+) s using ([\d.]+) GiB")


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


def scrape(url: str) -> dict:
    """The server's /metrics: steps and their wall seconds by kind (prefill / decode), and the engine's gauges."""
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()

    def value(name: str) -> float:
        line = next((ln for ln in lines if ln.startswith(name + " ")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    out = {f"{kind}_{stat}": value(f'lopa_step_seconds_{stat}{{kind="{kind}"}}')
           for kind in ("prefill", "decode") for stat in ("count", "sum")}
    out.update({key: value(name) for key, name in GAUGES.items()})
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


def cpu_seconds(pid: int) -> dict:
    """CPU seconds (user + system) the server spent so far: its main thread (uvicorn's event loop: HTTP,
    validation, tokenization, SSE) and the whole process (the engine thread, torch's threads). Linux only."""
    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    try:
        return {"loop_cpu_s": read(f"/proc/{pid}/task/{pid}/stat"), "process_cpu_s": read(f"/proc/{pid}/stat")}
    except (OSError, ValueError, IndexError):
        return {}


def compile_cache_state() -> str:
    """Whether torch.compile's on-disk cache (inductor's default folder) already holds kernels: a server that
    finds them starts faster than on a fresh machine."""
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                  or Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
    return "warm" if folder.is_dir() and any(folder.iterdir()) else "empty"


def start_server(args, variant: str) -> tuple[subprocess.Popen, str, float, Path]:
    """`lopa serve` with the variant's flags, then ``--server-arg``s, once /health answers 200: the process, its
    URL, the seconds from process start to then, its log."""
    port = free_port()
    cmd = [sys.executable, "-m", "lopa", "serve", "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(max(args.concurrency)), "--max-pending", str(10 * max(args.concurrency)),
           "--served-model-name", "bench", *(FLAGS[k](v) for k, v in VARIANTS[variant].items()), *args.server_arg]
    path = args.out / f"server_log_{variant}.txt"
    t0 = time.perf_counter()
    with open(path, "wb") as log:  # a file, not a pipe: a pipe nobody drains blocks the server
        server = subprocess.Popen(cmd, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    tail = lambda: path.read_bytes()[-2000:].decode(errors="replace")  # noqa: E731
    while time.perf_counter() - t0 < args.startup_timeout:
        if server.poll() is not None:
            raise RuntimeError(f"lopa serve ({variant}) exited: {tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server, f"http://127.0.0.1:{port}", time.perf_counter() - t0, path
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"lopa serve ({variant}) did not come up in {args.startup_timeout} s: {tail()}")


def level_row(results: list[dict], wall: float, before: dict, after: dict) -> dict:
    """One level's numbers: rates over its wall time, latency percentiles, /metrics deltas."""
    d = {k: after[k] - before[k] for k in after if k in before}
    first = [r["first_block_s"] for r in results]
    last = [r["last_token_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "first_block_p50_s": percentile(first, 50),
            "first_block_p99_s": percentile(first, 99), "last_token_p50_s": percentile(last, 50),
            "last_token_p99_s": percentile(last, 99), "decode_steps": int(d["decode_count"]),
            "prefill_steps": int(d["prefill_count"]), "engine_busy": (d["decode_sum"] + d["prefill_sum"]) / wall,
            "decode_step_ms": 1e3 * d["decode_sum"] / max(1, d["decode_count"]),
            **{key: int(d[key]) for key in GAUGES}, "texts": [r["text"] for r in results],
            "loop_cpu": d["loop_cpu_s"] / wall if "loop_cpu_s" in d else None,
            "process_cpu": d["process_cpu_s"] / wall if "process_cpu_s" in d else None}


def serve_variant(args, variant: str, prompts: list[str], settings: dict, state: dict) -> None:
    """Start the variant's server, run every round over the levels, record the rows and the summary, stop it."""
    cache = compile_cache_state()
    server, url, startup_s, log_path = start_server(args, variant)
    try:
        warm = WARMUP_LOG.search(log_path.read_text(errors="replace"))
        summary = state["variants"][variant] = {
            "flags": [FLAGS[k](v) for k, v in VARIANTS[variant].items()] + args.server_arg, "startup_s": startup_s,
            "compile_cache_at_start": cache, "warmup_graphs": int(warm[1]) if warm else None,
            "warmup_s": float(warm[2]) if warm else None, "warmup_gib": float(warm[3]) if warm else None}
        print(f"{variant}: server up in {startup_s:.1f} s (compile cache {cache})", flush=True)
        body = lambda p: {"model": "bench", "prompt": p, "max_tokens": args.gen_length, "stream": True,  # noqa: E731
                          "stream_options": {"include_usage": True}, **settings}
        for rnd in range(args.rounds):
            for c in args.concurrency:
                before = {**scrape(url), **cpu_seconds(server.pid)}
                results, wall = asyncio.run(load_level(url, [body(p) for p in prompts[:n_requests(args, c)]], c))
                after = {**scrape(url), **cpu_seconds(server.pid)}
                row = {"variant": variant, "round": "cold" if rnd == 0 else f"warm {rnd}", "concurrency": c,
                       **level_row(results, wall, before, after)}
                state["rows"].append(row)
                print(f"{variant} {row['round']}, concurrency {c}: {row['tokens_per_s']:.0f} tok/s, "
                      f"{row['requests_per_s']:.2f} req/s", flush=True)
                write(args, state)
        summary.update({f"{key}_after_start": int(v) for key, v in scrape(url).items() if key in GAUGES})
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    write(args, state)


def n_requests(args, c: int) -> int:
    return max(args.min_requests, args.waves * c)


def runner_fields(server_args: list[str]) -> dict:
    """The RunnerConfig fields among --server-arg flags (``--name=value``, ``--flag``, ``--no-flag``; a value read
    as JSON, else as text), so that generate_many runs the server's engine settings; max_num_seqs stays the
    script's (the largest level); other flags (the HTTP side) are the server's alone."""
    import dataclasses

    import lopa

    names = {f.name for f in dataclasses.fields(lopa.RunnerConfig)} - {"max_num_seqs"}
    fields = {}
    for arg in server_args:
        flag, eq, value = arg.lstrip("-").partition("=")
        name = flag.replace("-", "_")
        negated = not eq and name.startswith("no_") and name[3:] in names
        name = name[3:] if negated else name
        if name not in names:
            continue
        if not eq:
            fields[name] = not negated
            continue
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value
    return fields


def ceiling_runner(args, variant: str):
    """The server's engine settings for generate_many, without the warm-up (the first pass warms up instead):
    the variant's and the --server-arg flags' RunnerConfig fields, the attention the warm-up would have picked and
    its slot size, so the steps are the server's."""
    import lopa
    import torch

    fields = {**VARIANTS[variant], **runner_fields(args.server_arg)}
    warmup = fields.pop("warmup", True)
    gpu = args.device != "cpu" and torch.cuda.is_available()
    if gpu and fields.get("attention", "auto") == "auto":
        fields["attention"] = "flex" if warmup else "sdpa"
    if gpu and warmup:
        from lopa.api import WARMUP_POSITIONS
        from lopa.config import compiles_update, device_step_min_of

        if "device_step" not in fields:  # what the server's automatic device path resolves to with its warm-up
            fields["device_step"] = True
            on = lopa.RunnerConfig(compile_update=fields.get("compile_update"))
            compiled = compiles_update(on, fields.get("fuse", True), params=0)  # the embedded model: small
            fields.setdefault("device_step_min", device_step_min_of(on, compiled))
        fields.setdefault("max_positions", WARMUP_POSITIONS)
    return lopa.RunnerConfig(device=args.device, max_num_seqs=max(args.concurrency), warmup=False, **fields)


def ceilings(args, variant: str, prompts: list[str], settings: dict, state: dict) -> None:
    """generate_many per level on one model, at most c requests admitted at a time: tokens/s of the second pass."""
    import lopa
    import torch

    model = lopa.load_model(runner=ceiling_runner(args, variant))
    config = lopa.decode_config(None, model.model_type, gen_length=args.gen_length, **settings)
    out = state["ceilings"].setdefault(variant, {})
    for c in args.concurrency:
        model.engine.scheduler.max_num_seqs = c  # admission as generate_many at max_num_seqs = c; slots as the server
        batch = prompts[:n_requests(args, c)]
        passes = []
        for _ in range(2):
            before = model.engine.counters.as_dict()
            t0 = time.perf_counter()
            results = lopa.generate_many(model, batch, config)
            wall = time.perf_counter() - t0
            passes.append((results, wall, before, model.engine.counters.as_dict()))
        (first, first_wall, _, _), (results, wall, before, after) = passes
        d = {k: after[k] - before[k] for k in ("decode_steps", "prefill_steps", "decode_s", "captures_after_start",
                                               "recompiles_after_start")}
        tokens = sum(r.stats.generated_tokens for r in results)
        out[c] = {"tokens_per_s": tokens / wall, "requests_per_s": len(batch) / wall, "wall_s": wall,
                  "tokens": tokens, "first_pass_tokens_per_s": sum(r.stats.generated_tokens for r in first) / first_wall,
                  "texts": [r.text for r in results], "decode_steps": d["decode_steps"],
                  "prefill_steps": d["prefill_steps"], "decode_step_ms": 1e3 * d["decode_s"] / max(1, d["decode_steps"]),
                  "captures": d["captures_after_start"], "recompiles": d["recompiles_after_start"]}
        print(f"{variant}: generate_many, {c} at a time: {out[c]['tokens_per_s']:.0f} tok/s", flush=True)
        write(args, state)
    close = getattr(model, "close", None)
    if close is not None:
        close()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ratios(state: dict) -> None:
    """Each row against generate_many at its c and against its round's smallest level; each variant's targets."""
    for r in state["rows"]:
        ceil = state["ceilings"].get(r["variant"], {}).get(r["concurrency"])
        r["ceiling_tokens_per_s"] = ceil["tokens_per_s"] if ceil else None
        r["vs_ceiling"] = r["tokens_per_s"] / ceil["tokens_per_s"] if ceil else None
        r["equal_to_ceiling"] = sum(a == b for a, b in zip(r["texts"], ceil["texts"])) if ceil else None
        same = [o for o in state["rows"] if (o["variant"], o["round"]) == (r["variant"], r["round"])]
        r["vs_lowest_c"] = r["tokens_per_s"] / min(same, key=lambda o: o["concurrency"])["tokens_per_s"]
    hi = max(state["meta"]["concurrency"])
    for name, v in state["variants"].items():
        for rnd in ("cold", "warm"):  # the largest level of the cold round and of the last warm round
            top = [r for r in state["rows"] if r["variant"] == name and r["round"].startswith(rnd) and
                   r["concurrency"] == hi]
            top = top[-1] if top else None
            v[f"{rnd}_top_vs_lowest_c"] = top["vs_lowest_c"] if top else None
            v[f"{rnd}_top_vs_ceiling"] = top["vs_ceiling"] if top else None


def fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None else format(x, spec)


def markdown(state: dict) -> str:
    meta, levels = state["meta"], state["meta"]["concurrency"]
    hi, lo = max(levels), min(levels)
    notes = []
    lines = [f"Device: {meta['device']} ({meta['threads']} torch threads); commit {meta['commit']}; {meta['date']}; "
             f"settings {meta['settings']}; levels {levels}, rounds {meta['rounds']} (round 0 cold).", "",
             f"| variant | server flags | start-up s (compile cache) | warm-up graphs, s, GiB | after the run: "
             f"captures / recompiles / eager / device / partial steps | cold c={hi} / c={lo} (>= 3x) | cold server / "
             f"generate_many at c={hi} (>= 0.8) | warm c={hi} / c={lo} (>= 8x) | warm server / generate_many at "
             f"c={hi} (>= 0.85) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in state["variants"].items():
        for what in ("server", "ceiling"):
            if v.get(f"{what}_error"):
                notes.append(f"- {name}: {what} failed: {' '.join(v[f'{what}_error'].split())[:300]}")
        if v.get("startup_s") is None:
            continue
        warm = f"{v['warmup_graphs']}, {v['warmup_s']:.1f}, {v['warmup_gib']:.2f}" if v["warmup_graphs"] else "-"
        after = " / ".join(fmt(v.get(f"{k}_after_start"), "d") for k in GAUGES)
        lines.append(f"| {name} | {' '.join(v['flags']) or '(defaults)'} | {v['startup_s']:.1f} "
                     f"({v['compile_cache_at_start']}) | {warm} | {after} | {fmt(v['cold_top_vs_lowest_c'], '.1f')}x | "
                     f"{fmt(v['cold_top_vs_ceiling'], '.0%')} | {fmt(v['warm_top_vs_lowest_c'], '.1f')}x | "
                     f"{fmt(v['warm_top_vs_ceiling'], '.0%')} |")
    lines += ([""] + notes if notes else []) + ["", f"| variant | round | c | requests | req/s | tok/s | first block p50 / p99 | last token p50 / p99 | "
              f"generate_many tok/s | server / generate_many | tok/s vs c={lo} | answers equal generate_many | "
              "engine busy | event loop CPU (server process CPU) | decode / prefill steps (generate_many) | "
              "ms per decode step (generate_many) | captures / recompiles / eager / device / partial steps |",
              "|" + "---|" * 17]
    for r in state["rows"]:
        ceil = state["ceilings"].get(r["variant"], {}).get(r["concurrency"], {})
        lines.append(
            f"| {r['variant']} | {r['round']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['first_block_p50_s'] * 1e3:.0f} / {r['first_block_p99_s'] * 1e3:.0f} ms | "
            f"{r['last_token_p50_s'] * 1e3:.0f} / {r['last_token_p99_s'] * 1e3:.0f} ms | "
            f"{fmt(r['ceiling_tokens_per_s'], '.0f')} | {fmt(r['vs_ceiling'], '.0%')} | {r['vs_lowest_c']:.1f}x | "
            f"{fmt(r['equal_to_ceiling'], 'd')}/{r['requests']} | {r['engine_busy']:.0%} | "
            f"{fmt(r['loop_cpu'], '.0%')} ({fmt(r['process_cpu'], '.0%')}) | "
            f"{r['decode_steps']} / {r['prefill_steps']} ({ceil.get('decode_steps', '-')} / "
            f"{ceil.get('prefill_steps', '-')}) | {r['decode_step_ms']:.2f} ({fmt(ceil.get('decode_step_ms'), '.2f')}) "
            f"| {' / '.join(str(r[k]) for k in GAUGES)} |")
    return "\n".join(lines) + "\n"


def write(args, state: dict) -> None:
    """JSON + Markdown of what is measured so far (written after each level, so a cut-off run keeps its rows)."""
    ratios(state)
    (args.out / "serve_load.json").write_text(json.dumps(state, indent=1))
    (args.out / "serve_load.md").write_text(markdown(state))


def metadata(args, settings: dict) -> dict:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    return {"device": device, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "concurrency": args.concurrency, "rounds": args.rounds, "server_args": args.server_arg,
            "counting": "tokens = usage.completion_tokens (up to and including the first EOS); first block = "
                        "first SSE chunk with text; rates over each level's wall time; start-up = process start "
                        "to the first /health 200"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="host,device", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="a `lopa serve` flag added to every variant's server, after the variant's own (repeat; "
                         "--server-arg=--no-warmup); generate_many does not see it")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the levels per server: the first is cold")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--waves", type=int, default=4, help="N = max(min_requests, waves * concurrency)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--strategy", default="lopa")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--startup-timeout", type=float, default=480.0, help="seconds for a server to answer /health")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="also time generate_many on the same prompts (--no-ceiling: the servers only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in both processes (default: "
                    "torch's); 1 on a CPU shared with other work, where spinning OpenMP threads cost most")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or args.rounds < 1:
        ap.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})" if unknown else "--rounds: >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server process reads it at start
    from lopa.eval.tasks import gsm8k

    settings = {"strategy": args.strategy, "k": args.k}
    prompts = [p.prompt for p in gsm8k(None, n_requests(args, max(args.concurrency)))]
    args.out.mkdir(parents=True, exist_ok=True)
    state = {"meta": metadata(args, {**settings, "gen_length": args.gen_length}), "variants": {}, "rows": [],
             "ceilings": {}}
    for variant in args.variants:  # the server first: its start-up meets the compile cache as earlier ones left it
        try:
            serve_variant(args, variant, prompts, settings, state)
        except Exception as err:  # noqa: BLE001 - the next variant still runs; the table says why this one stopped
            state["variants"].setdefault(variant, {})["server_error"] = f"{type(err).__name__}: {err}"
            print(f"{variant}: the server run failed: {err!r}", flush=True)
            write(args, state)
            continue
        if args.ceiling:
            try:
                ceilings(args, variant, prompts, settings, state)
            except Exception as err:  # noqa: BLE001 - the servers' rows stand without it; the table says why
                state["variants"][variant]["ceiling_error"] = f"{type(err).__name__}: {err}"
                print(f"{variant}: generate_many failed: {err!r}", flush=True)
                write(args, state)
    print(markdown(state))
    if any("server_error" in v or "ceiling_error" in v for v in state["variants"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
