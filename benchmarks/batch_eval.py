"""End to end on the default model: the same problems decoded one at a time and concurrently, in one run.

What `lopa eval --batch-size N` does, for N = 1 and N = --batch-size side by side, per dtype: tokens/s (generated
tokens over the engine's decode-step seconds, prefill apart), accuracy, TPF (tokens up to EOS / decode forwards
of each request), and the share of problems whose generated tokens are identical to the batch-1 run (kernels
change with the row count, so in bf16 this is measured, not asserted). Writes JSON and a Markdown table.

    PYTHONPATH=src python3 benchmarks/batch_eval.py --n 1000 --batch-size 32 --dtypes bfloat16,float32 --out $OUT/e2e
    PYTHONPATH=src python3 benchmarks/batch_eval.py --n 4 --batch-size 2 --dtypes float32 --out /tmp/x   # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

import lopa
from lopa.eval.harness import score
from lopa.eval.tasks import gsm8k

from step_latency import git_commit


def run(model, problems, cfg) -> dict:
    before = dataclasses.replace(model.engine.counters)
    t = time.perf_counter()
    results = lopa.generate_many(model, [p.prompt for p in problems], cfg)
    wall = time.perf_counter() - t
    c = model.engine.counters
    decode_s = c.decode_s - before.decode_s
    tokens = sum(r.stats.generated_tokens for r in results)
    forwards = sum(r.stats.decode_forwards for r in results)
    correct = [score(p, r.text)[0] for p, r in zip(problems, results)]
    return {"tokens": tokens, "decode_forwards": forwards, "tpf": tokens / max(1, forwards),
            "accuracy": sum(correct) / len(problems), "decode_s": decode_s, "wall_s": wall,
            "tokens_per_s": tokens / max(1e-9, decode_s), "wall_tokens_per_s": tokens / wall,
            "requests_per_step": (c.requests - before.requests) / max(1, c.decode_steps - before.decode_steps),
            "ids": [r.token_ids for r in results], "correct": correct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--strategies", default="lopa:7,d2f:0", help="strategy:k,...")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_eval"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    problems = gsm8k(None, args.n)
    rows = []
    for dtype in args.dtypes.split(","):
        models = {bs: lopa.load_model(runner=lopa.RunnerConfig(dtype=dtype, max_num_seqs=bs))
                  for bs in (1, args.batch_size)}
        for spec in args.strategies.split(","):
            name, k = spec.split(":")
            cfg = lopa.decode_config(None, "dream", strategy=name, k=int(k), gen_length=args.gen_length)
            lopa.generate_many(models[args.batch_size], [p.prompt for p in problems[:args.batch_size]], cfg)  # warm-up
            lopa.generate_many(models[1], [problems[0].prompt], cfg)
            solo = run(models[1], problems, cfg)
            batched = run(models[args.batch_size], problems, cfg)
            same = sum(a == b for a, b in zip(solo["ids"], batched["ids"])) / len(problems)
            flips = sum(a != b for a, b in zip(solo["correct"], batched["correct"]))
            row = {"dtype": dtype, "strategy": f"{name} k={k}" if name == "lopa" else name, "n": len(problems),
                   "batch_size": args.batch_size, "identical_tokens": same, "answers_flipped": flips,
                   "speedup": batched["tokens_per_s"] / solo["tokens_per_s"],
                   "wall_speedup": solo["wall_s"] / batched["wall_s"],
                   **{f"solo_{key}": v for key, v in solo.items() if key not in ("ids", "correct")},
                   **{f"batched_{key}": v for key, v in batched.items() if key not in ("ids", "correct")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"device": device, "commit": git_commit(), "torch": torch.__version__, "n": args.n,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counting": "tokens up to and including the first EOS; TPF per request's decode forwards; tokens/s over "
                        "the engine's decode-step seconds (prefill apart); wall = the whole run"}
    (args.out / "batch_eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"| dtype | strategy | accuracy b=1 / b={args.batch_size} | TPF b=1 / b={args.batch_size} | tok/s b=1 | "
             f"tok/s b={args.batch_size} | speed-up | wall speed-up | identical tokens | answers flipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['strategy']} | {100 * r['solo_accuracy']:.1f}% / {100 * r['batched_accuracy']:.1f}% | "
                     f"{r['solo_tpf']:.2f} / {r['batched_tpf']:.2f} | {r['solo_tokens_per_s']:.0f} | "
                     f"{r['batched_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['wall_speedup']:.1f}x | "
                     f"{100 * r['identical_tokens']:.1f}% | {r['answers_flipped']} |")
    (args.out / "batch_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
