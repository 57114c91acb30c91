"""Cold against warm: a varied workload decoded twice in one fresh process, per engine variant.

The workload (seeded): prompts of lengths spread log-uniformly over [--min-prompt, --max-prompt] tokens, each
request with its own strategy (lopa / d2f / threshold) and k (0, 3, 7, 14), more requests than max_num_seqs, so
they join and leave between steps. Pass 0 runs right after load_model (whatever start-up did is in the
"load" time, reported apart); pass 1 repeats the same workload in the same process. Each variant runs in a
fresh subprocess, so compiled kernels and captured graphs never carry over between variants:

* "lazy sdpa": RunnerConfig(attention="sdpa", warmup=False): each new shape key (incl. the padded key span)
  captures on first use - the engine before start-up capture;
* "warm flex": RunnerConfig(attention="flex", warmup=True): the graph set captured inside load_model; prefill
  steps run on the warmed shapes too;
* "warm flex (eager prefill)": the same with prefill steps forced onto the eager path (exact shapes: each new
  prompt length meets new kernel shapes), to measure what the bucketed prefill changes;
* "warm flex (eager update)" / "warm flex (compiled update)": "warm flex" with RunnerConfig.compile_update False /
  True: the device path's update eager / compiled whatever the model's size ("warm flex" leaves it to compile_update's
  "auto": compiled for the embedded model, eager at Dream-7B shape), to measure what compiling it costs a start and
  buys a step.
* "warm flex (flat on)" / "warm flex (flat off)": "warm flex" with RunnerConfig.flat_queries True / False: the
  device path's forward on the flat query axis where a step has a flat count (its counts captured at start-up too)
  or never, to measure what the flat axis costs a start and buys a step ("warm flex" leaves it to flat_queries'
  default: off).

Each variant starts with empty on-disk kernel caches of its own (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR in a
fresh temporary folder), so its start-up is a first start on this machine whatever ran before; a variant named
again (the default: "warm flex" twice) runs in a fresh process on the first one's caches: a second start, what a
server restart on the same machine costs. --cache-dir DIR shares one kept cache folder instead (a second run with
the same DIR is a second start: for runs too long to hold both starts in one command).

Per pass: prefill and decode seconds (the engine's counters), the distinct prefill shapes the pass met that no
earlier step had (bucketed keys on the static path, exact shapes eagerly); per variant: the warm-up's
torch.compile graphs and seconds per key (min / median / max, and the seconds of keys that compiled something
against those that only captured).

The results are written after every variant (a run cut short keeps those it finished); the child's log goes to
stderr as it runs, and a SIGTERM to this process (``timeout``) kills the child too.

Counting: generated tokens up to EOS of every request; tokens/s = those tokens over the pass's wall time
(prefill included: the users' view); ms/step over the engine's steps; captures / recompiles / eager steps
after start-up from the engine's counters.

    PYTHONPATH=src python3 benchmarks/cold_start.py --out benchmarks/results/cold_start_h100          # default model
    PYTHONPATH=src python3 benchmarks/cold_start.py --shape dream-7b --out benchmarks/results/cold_start_h100
    PYTHONPATH=src python3 benchmarks/cold_start.py --variants "lazy sdpa,warm flex" --out /tmp/x    # the old engine
    PYTHONPATH=src python3 benchmarks/cold_start.py --tiny --out /tmp/x                                # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {"lazy sdpa": dict(attention="sdpa", warmup=False), "warm flex": dict(attention="flex", warmup=True),
            "warm flex (eager prefill)": dict(attention="flex", warmup=True),
            "warm flex (eager update)": dict(attention="flex", warmup=True, compile_update=False),
            "warm flex (compiled update)": dict(attention="flex", warmup=True, compile_update=True),
            "warm flex (keys unsplit)": dict(attention="flex", warmup=True, key_splits=1),
            "warm flex (flat on)": dict(attention="flex", warmup=True, flat_queries=True),
            "warm flex (flat off)": dict(attention="flex", warmup=True, flat_queries=False)}
STRATEGIES = ("lopa", "d2f", "threshold")
KS = (0, 3, 7, 14)


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[list[int], dict]]:
    """n (prompt ids, DecodeConfig fields): log-uniform prompt lengths, strategies and k in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        prompt = [rng.randrange(vocab) for _ in range(length)]
        out.append((prompt, {"strategy": STRATEGIES[i % 3], "k": KS[i % 4]}))
    return out


def load(args, variant: str):
    import lopa
    from lopa.api import build_model

    runner = lopa.RunnerConfig(max_num_seqs=args.max_num_seqs, device="cpu" if args.tiny else "auto",
                               **VARIANTS[variant])
    if args.shape is None:
        return lopa.load_model(runner=runner)
    sys.path.insert(0, str(Path(__file__).parent))
    from bp_latency import RandomSource

    return build_model(RandomSource(args.shape), runner, name=Path(f"random-{args.shape}"))


def eager_prefill() -> None:
    """Route every prefill step to the eager path (the engine before bucketed prefill), for the side-by-side run."""
    from lopa.runner.graphs import GraphExecutor

    supports = GraphExecutor.supports
    GraphExecutor.supports = lambda self, items: not items[0].batch.prefill and supports(self, items)


def warmup_row(stats) -> dict:
    """The warm-up's compiles and its seconds per key (keys that compiled a torch.compile graph apart)."""
    if stats is None or not stats.warmup_key_s:
        return {}
    secs, comp = stats.warmup_key_s, stats.warmup_key_compiles
    return {"warmup_compiles": stats.warmup_compiles, "key_s_min": min(secs), "key_s_median": statistics.median(secs),
            "key_s_max": max(secs), "keys_compiling": sum(1 for c in comp if c),
            "s_compiling_keys": stats.compiling_s,
            "s_other_keys": sum(secs) - stats.compiling_s,
            "compiling_keys": [[name, t, c] for name, t, c in zip(stats.warmup_key_names, secs, comp) if c]}


def run_variant(args, variant: str) -> dict:
    """In this (fresh) process: load, then the workload twice."""
    import lopa

    if variant.endswith("(eager prefill)"):
        eager_prefill()
    t0 = time.perf_counter()
    model = load(args, variant)
    sync()
    load_s = time.perf_counter() - t0
    spec = model.loaded.spec
    # prompts from the model's own tokens (no special ids), so the default model sees real text pieces
    vocab = min(spec.vocab_size, spec.mask_id, *spec.eos_ids) - 1
    work = workload(args.requests, args.min_prompt, args.max_prompt, vocab)
    engine = model.engine
    graphs = model.runner.graphs
    stats = graphs.refresh_stats() if graphs is not None else None
    result = {"variant": variant, "load_s": load_s, "warmup_s": stats.warmup_s if stats else 0.0,
              "warmup_graphs": stats.warmup_graphs if stats else 0,
              "warmup_gib": stats.warmup_bytes / 2**30 if stats else 0.0, **warmup_row(stats), "passes": []}
    print(json.dumps({"variant": variant, **{k: v for k, v in result.items() if k != "passes"}}), flush=True)
    shapes = set(model.runner.prefill_shapes)
    for p in range(args.passes):
        c0 = dict(engine.counters.as_dict())
        seqs = [engine.prepare(ids, lopa.decode_config(gen_length=args.gen_length, **fields)) for ids, fields in work]
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            outs = engine.generate(seqs)
        sync()
        wall = time.perf_counter() - t
        c1 = engine.counters.as_dict()
        steps = c1["steps"] - c0["steps"]
        tokens = sum(o.stats.generated_tokens for o in outs)
        row = {"pass": p, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "steps": steps,
               "ms_per_step": 1e3 * wall / max(1, steps)}
        for key in ("prefill_s", "decode_s", "prefill_steps", "decode_steps", "captures_after_start",
                    "recompiles_after_start", "eager_decode_steps", "eager_prefill_steps", "partial_steps",
                    "device_steps", "flat_steps"):
            row[key] = c1[key] - c0[key] if key in c1 else None  # None: a tree whose counters lack it
        row["new_prefill_shapes"] = len(model.runner.prefill_shapes - shapes)  # met for the first time in this pass
        shapes |= model.runner.prefill_shapes
        row["prefill_shapes"] = len(shapes)
        result["passes"].append(row)
        print(json.dumps({"variant": variant, **row}), flush=True)
    p0, p1 = result["passes"][0], result["passes"][-1]
    result["pass0_over_pass1"] = p0["tokens_per_s"] / p1["tokens_per_s"] if len(result["passes"]) > 1 else None
    return result


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(results: list[dict]) -> str:
    lines = ["| variant | load s (warm-up s, graphs, GiB) | pass | tokens/s | ms/step | steps | prefill s (steps) | "
             "decode s (steps) | new prefill shapes | captures | recompiles | eager decode / prefill steps | "
             "device / flat steps | pass 0 / pass 1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:100]} |" + "  |" * 12)
            continue
        for row in r["passes"]:
            start = (f"{r['load_s']:.1f} ({r['warmup_s']:.1f}, {r['warmup_graphs']}, {r['warmup_gib']:.2f})"
                     if row["pass"] == 0 else "")
            ratio = f"{r['pass0_over_pass1']:.2f}" if row["pass"] == 0 and r["pass0_over_pass1"] else ""
            lines.append(f"| {r['variant'] if row['pass'] == 0 else ''} | {start} | {row['pass']} | "
                         f"{row['tokens_per_s']:.0f} | {row['ms_per_step']:.2f} | {row['steps']} | "
                         f"{row['prefill_s']:.2f} ({row['prefill_steps']}) | {row['decode_s']:.2f} "
                         f"({row['decode_steps']}) | {row['new_prefill_shapes']} | {row['captures_after_start']} | "
                         f"{row['recompiles_after_start']} | {row['eager_decode_steps']} / "
                         f"{row['eager_prefill_steps']} | {row['device_steps']} / {row['flat_steps']} "
                         f"| {ratio} |")
    warm = [r for r in results if "warmup_compiles" in r]
    if warm:
        lines += ["", "| variant | warm-up s | keys | torch.compile graphs | keys compiling | s in them | s in the "
                  "others | s/key min / median / max | compiling: forward keys (s, graphs) | update keys (s, graphs) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in warm:
            paths = [[k for k in r["compiling_keys"] if k[0].startswith(path)] for path in ("forward", "update")]
            lines.append(f"| {r['variant']} | {r['warmup_s']:.1f} | {r['warmup_graphs']} | {r['warmup_compiles']} | "
                         f"{r['keys_compiling']} | {r['s_compiling_keys']:.1f} | {r['s_other_keys']:.1f} | "
                         f"{r['key_s_min']:.2f} / {r['key_s_median']:.2f} / {r['key_s_max']:.2f} | "
                         + " | ".join(f"{len(keys)} ({sum(k[1] for k in keys):.1f}, {sum(k[2] for k in keys)})"
                                      for keys in paths) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_start"))
    ap.add_argument("--shape", default=None, help="random weights at a step_latency.py shape (default: the embedded "
                    "model)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test (tiny shape, few requests)")
    ap.add_argument("--variants", default="warm flex (eager prefill),warm flex,warm flex",
                    help=f"comma-separated, of {list(VARIANTS)}; a repeated name is a second start on the same caches")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=None, help="default: 3000, or 400 for the embedded model")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="on-disk kernel caches shared by every variant and kept (a "
                    "later run with the same folder measures a second start); default: a fresh one per variant")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one variant in this process
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.requests, args.max_num_seqs, args.gen_length = "tiny", 6, 2, 16
    if args.max_prompt is None:
        args.max_prompt = 400 if args.shape is None else (60 if args.tiny else 3000)
    if args.child is not None:
        print("RESULT " + json.dumps(run_variant(args, args.child)), flush=True)
        return
    results, caches = [], {}
    # the child's log goes straight to ours (a run cut short still shows how far it got); a SIGTERM here (a `timeout`)
    # exits through subprocess.run, which kills the child rather than leave it on the GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for variant in args.variants.split(","):
        again = variant in caches  # a repeat: a second start on the first one's on-disk caches
        cache = caches.setdefault(variant, args.cache_dir or tempfile.mkdtemp(prefix="lopa_cold_start_"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
        cmd = [sys.executable, __file__, "--child", variant] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        name = f"{variant}, second start" if again else variant
        results.append({**json.loads(line[7:]), "variant": name} if line else {"variant": name,
                                                                               "error": f"exit {proc.returncode}"})
        md = write(args, results)  # after every variant: a run cut short keeps the ones it finished
    for cache in set(caches.values()) - {args.cache_dir}:
        shutil.rmtree(cache, ignore_errors=True)
    print(md)


def write(args, results: list[dict]) -> str:
    """The JSON and the Markdown table of the variants so far -> the table."""
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    from step_latency import git_commit

    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
            "model": args.shape or "embedded default", "requests": args.requests, "max_num_seqs": args.max_num_seqs,
            "prompt_tokens": [args.min_prompt, args.max_prompt], "gen_length": args.gen_length, "ks": KS,
            "strategies": STRATEGIES, "commit": git_commit(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counting": "tokens to EOS of every request over each pass's wall time, prefill included"}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"cold_start_{(args.shape or 'default').replace('-', '_')}"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results)
    (args.out / f"{name}.md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
