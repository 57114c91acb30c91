"""k_policy "load" against fixed k under load (issue 16): the Dream-7B cost of a step, the default model's TPF,
accuracy, throughput and latency at 1, 8 and 32 concurrent requests, and the two put together, in one run.

1. Cost: one engine decode step at Dream-7B shape (random weights, lopa's static path: CUDA graphs + fused
   kernels) for n requests x K branches x W = 32 columns over P-token prefixes: step ms against the step's
   query positions n*K*W. step_rows = the most positions a one-request step takes for at most --knee times
   the cost of a one-request, one-branch step (one memory-bound forward), read off that curve.
2. Default model: the same N generated GSM8K-style problems through the engine at max_num_seqs = c, for
   each c, with fixed k (--fixed-ks) and with k = --k under the load budget (RunnerConfig.step_rows from 1).
   Counted: generated tokens up to EOS; TPF = tokens / the requests' own decode forwards; positions per
   token = the decode steps' query positions / tokens; tokens/s = tokens / the engine's decode-step seconds
   (prefill apart); latency = a request's own step seconds, prefill included (the time it ran; queueing
   for a slot not counted), p50 / p99.
3. Projection (labelled as one): every step of 2 re-timed at the Dream-7B cost of its (requests, positions),
   interpolated from 1, giving projected tokens/s and latency at Dream-7B cost with the default model's
   TPF. Dream-7B's own TPF on these problems is not measured here.

    PYTHONPATH=src python3 benchmarks/load_budget.py --out benchmarks/results/load_budget_h200
    PYTHONPATH=src python3 benchmarks/load_budget.py --tiny --n 4 --concurrency 1,2 --out /tmp/x  # CPU smoke test
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import gc
import json
import time
from pathlib import Path

import torch

import lopa
from lopa.config import decode_config
from lopa.eval.harness import score
from lopa.eval.tasks import gsm8k
from lopa.models.config import ModelConfig
from lopa.models.fused import EAGER, fused_ops
from lopa.models.spec import ModelSpec
from lopa.models.transformer import Transformer

from batch_throughput import decode_items, setup, step_fn
from step_latency import SHAPES, git_commit, timed


# -- 1. the cost of a step at Dream-7B shape --------------------------------------------------------------
def cost_grid(shape: str, device, dtype, ns: list[int], Ks: list[int], W: int, P: int, max_positions: int,
              reps: int) -> list[dict]:
    cfg = ModelConfig(**SHAPES[shape])
    spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    fuse = device.type == "cuda"
    model.ops = fused_ops(device, dtype) if fuse else EAGER
    cases = [(n, K) for n in ns for K in Ks if n * K * W <= max_positions]
    runner = setup(model, spec, device, dtype, max(n for n, _ in cases), max(K for _, K in cases), W, P, fuse)
    rows = []
    for n, K in cases:
        ms = timed(step_fn(runner, decode_items(spec, n, K, W, P), P), device, warmup=3, reps=reps) * 1e3
        rows.append({"n": n, "K": K, "positions": n * K * W, "step_ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    del runner, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _along(points: list[tuple[int, float]], x: float) -> float:
    """Piecewise-linear in x through sorted (x, y) points; flat below the first, linear past the last two but never
    falling there (noisy timings may make the last point cheaper than the one before: a larger step is not)."""
    xs = [p for p, _ in points]
    if x <= xs[0] or len(points) == 1:
        return points[0][1]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    slope = (y1 - y0) / (x1 - x0)
    return y1 + max(slope, 0.0) * (x - x1) if x > x1 else y0 + slope * (x - x0)


class CostModel:
    """Step ms at (requests, positions), interpolated in positions on each measured n, then in n."""

    def __init__(self, grid: list[dict]) -> None:
        self.curves = {}
        for r in grid:
            self.curves.setdefault(r["n"], []).append((r["positions"], r["step_ms"]))
        for pts in self.curves.values():
            pts.sort()
        self.ns = sorted(self.curves)

    def __call__(self, n: int, positions: int) -> float:
        i = bisect.bisect_left(self.ns, n)
        if i == 0 or i == len(self.ns):  # outside the measured n: the nearest curve
            return _along(self.curves[self.ns[min(i, len(self.ns) - 1)]], positions)
        n0, n1 = self.ns[i - 1], self.ns[i]
        y0, y1 = _along(self.curves[n0], positions), _along(self.curves[n1], positions)
        return y0 + (y1 - y0) * (n - n0) / (n1 - n0)

    def knee(self, factor: float) -> int:
        """The most positions whose one-request step costs at most factor x the smallest one-request step."""
        pts = self.curves[min(self.ns)]
        limit = factor * pts[0][1]
        best = pts[0][0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y1 <= limit:
                best = x1
            elif y0 <= limit:
                best = int(x0 + (x1 - x0) * (limit - y0) / (y1 - y0))
                break
        return best


# -- 2. the default model under each policy ---------------------------------------------------------------
def run_policy(model, problems, config, cost: CostModel) -> dict:
    engine = model.engine
    seqs = [engine.prepare(model.tokenizer.encode(p.prompt), config) for p in problems]
    engine.step_log = log = []
    try:
        outs = engine.generate(seqs)
    finally:
        engine.step_log = None
    tokens = sum(o.stats.generated_tokens for o in outs)
    forwards = sum(o.stats.decode_forwards for o in outs)
    decode = [s for s in log if s.kind == "decode"]
    decode_s = sum(s.seconds for s in decode)
    projected = {s.id: 0.0 for s in seqs}
    projected_decode_s = 0.0
    for step in log:
        t = cost(step.requests, step.positions) / 1e3
        projected_decode_s += t if step.kind == "decode" else 0.0
        for rid in step.request_ids:
            projected[rid] += t
    latency = sorted(o.stats.wall_s for o in outs)
    proj_latency = sorted(projected.values())
    correct = sum(score(p, model.tokenizer.decode(o.token_ids))[0] for p, o in zip(problems, outs))
    pct = lambda xs, q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    return {"n": len(problems), "accuracy": correct / len(problems), "tokens": tokens, "decode_forwards": forwards,
            "tpf": tokens / forwards, "decode_steps": len(decode),
            "requests_per_step": sum(s.requests for s in decode) / len(decode),
            "positions_per_step": sum(s.positions for s in decode) / len(decode),
            "positions_per_token": sum(s.positions for s in decode) / tokens,
            "branch_rows_per_token": sum(o.stats.branch_rows for o in outs) / tokens,
            "tokens_per_s": tokens / decode_s, "latency_p50_s": pct(latency, 0.5), "latency_p99_s": pct(latency, 0.99),
            "projected_tokens_per_s": tokens / projected_decode_s,
            "projected_latency_p50_s": pct(proj_latency, 0.5), "projected_latency_p99_s": pct(proj_latency, 0.99),
            "texts": [model.tokenizer.decode(o.token_ids) for o in outs]}


def markdown(meta: dict, grid: list[dict], rows: list[dict]) -> str:
    lines = [f"Device {meta['device']}; commit {meta['commit']}; {meta['date']}; default model {meta['dtype']}, "
             f"gen_length {meta['gen_length']}, N = {meta['n']} problems per run; step_rows = {meta['step_rows']} "
             f"(knee {meta['knee']}x). Counting: {meta['counting']}", "",
             f"Cost at {meta['shape']} shape (W = {meta['W']}, P = {meta['P']}):", "",
             "| requests | K | positions | step ms | x one-branch step |", "|---|---|---|---|---|"]
    base = grid[0]["step_ms"]
    lines += [f"| {r['n']} | {r['K']} | {r['positions']} | {r['step_ms']:.2f} | {r['step_ms'] / base:.2f} |" for r in grid]
    lines += ["", "| concurrent | policy | accuracy | TPF | positions/step | positions/token | tok/s (measured) | "
              f"latency p50 / p99 | vs fixed k=max, tok/s | projected tok/s at {meta['shape']} cost | projected latency "
              "p50 / p99 | projected vs fixed k=max |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['policy']} | {r['accuracy']:.1%} | {r['tpf']:.2f} | "
                     f"{r['positions_per_step']:.0f} | {r['positions_per_token']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['latency_p50_s'] * 1e3:.0f} / {r['latency_p99_s'] * 1e3:.0f} ms | {r['vs_ref']:.2f}x | "
                     f"{r['projected_tokens_per_s']:.0f} | {r['projected_latency_p50_s'] * 1e3:.0f} / "
                     f"{r['projected_latency_p99_s'] * 1e3:.0f} ms | {r['projected_vs_ref']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == policy]
        for ax, key in zip(axes, ("tokens_per_s", "projected_tokens_per_s")):
            ax.plot([r["concurrency"] for r in rs], [r[key] for r in rs], marker="o", label=policy)
    axes[0].set_title("default model, measured")
    axes[1].set_title("projected at Dream-7B step cost")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "load_budget.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/load_budget"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the cost grid at a tiny shape")
    ap.add_argument("--shape", default="dream-7b")
    ap.add_argument("--ns", default="1,2,4,8,16,32")
    ap.add_argument("--Ks", default="1,2,4,8,15")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--max-positions", type=int, default=8192, help="largest n*K*W step measured")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--knee", type=float, default=1.25, help="step_rows: positions at this x one-branch cost")
    ap.add_argument("--step-rows", type=int, default=None, help="override the knee's step_rows")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--n", type=int, default=128, help="problems per run")
    ap.add_argument("--k", type=int, default=14, help="k of the reference and the most the load budget takes")
    ap.add_argument("--fixed-ks", default="14,4", help="fixed-k runs (the first is the reference)")
    ap.add_argument("--gen-length", type=int, default=128)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cost_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = "tiny" if args.tiny else args.shape
    ns = [1, 2] if args.tiny else [int(x) for x in args.ns.split(",")]
    Ks = [1, 2, 4] if args.tiny else [int(x) for x in args.Ks.split(",")]
    W, P = (8, 16) if args.tiny else (args.window, args.prefix)
    concurrency = [int(x) for x in args.concurrency.split(",")]
    n = args.n
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    grid = cost_grid(shape, device, cost_dtype, ns, Ks, W, P, args.max_positions, 2 if args.tiny else args.reps)
    cost = CostModel(grid)
    step_rows = args.step_rows or cost.knee(args.knee)
    print(f"cost grid in {time.perf_counter() - t0:.0f} s; step_rows = {step_rows}", flush=True)

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape, "W": W, "P": P,
            "dtype": "bfloat16" if device.type == "cuda" else "float32", "gen_length": args.gen_length, "n": n,
            "knee": args.knee, "step_rows": step_rows, "commit": git_commit(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counting": "tokens up to EOS; TPF per request's own decode forwards; tok/s over the engine's decode-step "
                        "seconds (prefill apart); latency = a request's own step seconds (queueing not counted); "
                        f"projected = the same steps re-timed at the {shape} step cost (a projection)"}
    problems = gsm8k(None, n)
    fixed = [int(x) for x in args.fixed_ks.split(",")]
    rows = []
    for c in concurrency:
        model = lopa.load_model(runner=lopa.RunnerConfig(device=device.type, max_num_seqs=c, step_rows=step_rows))
        policies = {f"k={k} fixed": decode_config(None, model.model_type, strategy="lopa", k=k,
                                                  gen_length=args.gen_length) for k in fixed}
        policies[f"k={args.k} load"] = decode_config(None, model.model_type, strategy="lopa", k=args.k,
                                                     k_policy="load", gen_length=args.gen_length)
        with torch.inference_mode():
            for name, config in policies.items():
                run_policy(model, problems[:max(2 * c, 4)], config, cost)  # warm-up: graphs for these shapes
                r = run_policy(model, problems, config, cost)
                rows.append({"concurrency": c, "policy": name, **r})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "texts"}), flush=True)
        model.close()
        del model
        gc.collect()
        write(args.out, meta, grid, rows)  # after each level: a run cut off keeps the levels it finished
    print(markdown(meta, grid, rows))


def write(out: Path, meta: dict, grid: list[dict], rows: list[dict]) -> None:
    for r in rows:  # each against the reference (the first fixed k) at the same concurrency
        ref = next(x for x in rows if x["concurrency"] == r["concurrency"])
        r["vs_ref"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["projected_vs_ref"] = r["projected_tokens_per_s"] / ref["projected_tokens_per_s"]
        r["texts_equal_ref"] = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
    (out / "load_budget.json").write_text(json.dumps({"meta": meta, "cost": grid, "rows": rows}, indent=1))
    (out / "load_budget.md").write_text(markdown(meta, grid, rows))
    plot(rows, out)


if __name__ == "__main__":
    main()
