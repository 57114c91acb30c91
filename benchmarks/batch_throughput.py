"""Engine decode steps over n concurrent requests at Dream-7B shape: step time, rows/s, against the roofline
and against the same n iterations run one request at a time, all in one run.

One step = the engine's decode step for n requests, each with K = k+1 branches x W window columns over its
own cached P-token prefix (its own KV slot): ONE forward through lopa's model runner (the static path:
CUDA graphs + fused kernels on a GPU, the engine's default), the batched confidences, one device-to-host
copy, the winners' KV commits. "solo" = the same n iterations one request per forward, one after another (n x one single-request step).
The roofline of a case: all weights read once per step (shared by the n requests), each request's prefix
KV read once, and the step's FLOPs at the matmul rate measured in the same run (step_latency.py's model).
Host time per step = wall time of the step minus the replay of its captured graph alone (CUDA only).
Attention variants (RunnerConfig.attention) side by side in one run, each with its own runner over the same
weights: "flex" (FlexAttention over each request's real key span, graphs independent of the prefix length)
and "sdpa" (an additive mask over the padded span: the path before start-up capture); ratio = sdpa / flex.

    PYTHONPATH=src python3 benchmarks/batch_throughput.py --out benchmarks/results/batch_h200
    PYTHONPATH=src python3 benchmarks/batch_throughput.py --prefixes 512,2048,8192 --ks 0,7,14 --ns 1,16 --out ...
    PYTHONPATH=src python3 benchmarks/batch_throughput.py --prefixes 512 --ks 0 --ns 1,2 --capacity 8192 \
        --attention flex,flex:1,sdpa --out ...     # the serving slot: key splits with unsplit and SDPA beside them
    PYTHONPATH=src python3 benchmarks/batch_throughput.py --tiny --out /tmp/x     # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from lopa.decoding.base import ForwardBatch, ModelSpec, PredictSpec
from lopa.models.config import ModelConfig
from lopa.models.fused import EAGER, fused_ops
from lopa.models.transformer import Transformer
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import Commit, StepItem

from step_latency import SHAPES, costs, git_commit, measure_device, roofline, timed


def batch_costs(cfg: ModelConfig, n: int, K: int, W: int, P: int) -> dict:
    """One step over n requests: n times one iteration's FLOPs and KV bytes, the weights read once."""
    one = costs(cfg, K, W, P)
    weights = 2 * cfg.hidden_size * cfg.vocab_size * 2  # embedding + lm_head, bf16 (in other_bytes once)
    return {"linear_flops": n * one["linear_flops"], "other_flops": n * one["other_flops"],
            "linear_params": one["linear_params"], "other_bytes": weights + n * (one["other_bytes"] - weights)}


def setup(model, spec, device, dtype, n_max: int, K_max: int, W: int, P: int, fuse: bool, attention: str = "sdpa",
          capacity: int | None = None):
    """One runner per attention and prefix (as the engine has one), its n_max slots holding random P-token prefixes,
    each slot of ``capacity`` positions (default: P + K_max * W + 256, rounded up by the pool). ``attention``
    "flex:N" = flex with RunnerConfig.key_splits N ("flex:1": the keys never split)."""
    name, _, splits = attention.partition(":")
    runner = ModelRunner(model, spec, device, dtype, max_num_seqs=n_max, static=True, fuse=fuse, attention=name,
                         key_splits=int(splits) if splits else None)
    runner.reserve(n_max, max(capacity or 0, P + K_max * W + 256))
    torch.manual_seed(P + W)
    with torch.inference_mode():
        for s in range(n_max):
            prefix = torch.randint(0, spec.vocab_size - 2, (1, P))
            empty = torch.empty(0, dtype=torch.long)
            runner.execute([StepItem(s, ForwardBatch(prefix, 0, empty, commit=P, prefill=True), PredictSpec())])
            runner.commit([Commit(s, 0, 0, P)])
    return runner


def decode_items(spec, n: int, K: int, W: int, P: int) -> list[StepItem]:
    """n requests' decode forwards: K branches of W columns over their prefixes, the last half still masked."""
    items = []
    for s in range(n):
        tokens = torch.randint(0, spec.vocab_size - 2, (K, W))
        tokens[:, W // 2:] = spec.mask_id
        batch = ForwardBatch(tokens, P, torch.arange(W // 4, W), commit=W // 4)
        items.append(StepItem(s, batch, PredictSpec(suppress_ids=(spec.mask_id,))))
    return items


def step_fn(runner, items, P: int):
    @torch.inference_mode()
    def step():
        preds = runner.execute(items)
        runner.commit([Commit(it.slot, i, int(p.conf.mean(-1).argmax()), it.batch.commit)
                       for i, (it, p) in enumerate(zip(items, preds))])
        for it in items:
            runner.pool.lengths[it.slot] = P  # roll back: every repetition sees the same prefixes
    return step


def cases(runner, cfg, spec, device, ns, ks, W: int, P: int, peak: dict, reps: int, attention: str) -> list[dict]:
    rows = []
    for k in ks:
        K = k + 1
        try:
            solo_one = timed(step_fn(runner, decode_items(spec, 1, K, W, P), P), device, warmup=3, reps=reps)
        except Exception as err:  # noqa: BLE001 - recorded in the results, the other cases still run
            print(json.dumps({"k": k, "solo error": repr(err)}), flush=True)
            continue
        for n in ns:
            items = decode_items(spec, n, K, W, P)
            try:
                batched = timed(step_fn(runner, items, P), device, warmup=3, reps=reps)
                replay = None
                if device.type == "cuda":
                    st = runner.graphs.statics[runner.graphs.key(items)]
                    replay = timed(st.graph.replay, device, warmup=3, reps=reps)
            except Exception as err:  # noqa: BLE001
                print(json.dumps({"k": k, "n": n, "error": repr(err)}), flush=True)
                rows.append({"attention": attention, "P": P, "k": k, "n": n, "error": repr(err)})
                continue
            solo = n * solo_one
            roof, bound = roofline(batch_costs(cfg, n, K, W, P), peak)
            key = runner.graphs.key(items)
            splits = runner.splits_of(*key[:3]) if runner.graphs.attention == "flex" else None
            row = {"attention": attention, "P": P, "k": k, "n": n, "rows_per_step": n * K * W, "key_splits": splits,
                   "step_ms": batched * 1e3, "solo_ms": solo * 1e3,
                   "speedup_vs_solo": solo / batched, "roofline_ms": roof * 1e3, "x_roofline": batched / roof,
                   "bound": bound, "rows_per_s": n * K * W / batched,
                   "host_ms": None if replay is None else (batched - replay) * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/batch"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny shape")
    ap.add_argument("--shape", default="dream-7b")
    ap.add_argument("--ns", default="1,2,4,8,16,32")
    ap.add_argument("--ks", default="0,3,7,10")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--prefixes", default="512")
    ap.add_argument("--attention", default="flex,sdpa", help="static-path attentions timed side by side (flex:N = "
                    "flex with its keys in N chunks, RunnerConfig.key_splits; flex alone: the runner's choice)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--capacity", type=int, default=None, help="KV positions a slot (default: the prefix + the "
                    "largest window + 256); 8192 = the serving slot, where the key splits follow it (key_splits)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = "tiny" if args.tiny else args.shape
    cfg = ModelConfig(**SHAPES[shape])
    spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
    ns = [1, 2] if args.tiny else [int(x) for x in args.ns.split(",")]
    ks = [0, 3] if args.tiny else [int(x) for x in args.ks.split(",")]
    W = 8 if args.tiny else args.window
    prefixes = [16] if args.tiny else [int(x) for x in args.prefixes.split(",")]
    attentions = args.attention.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    peak = measure_device(device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    fuse = device.type == "cuda"
    model.ops = fused_ops(device, dtype) if fuse else EAGER
    rows = []
    for P in prefixes:
        for attention in attentions:
            runner = setup(model, spec, device, dtype, max(ns), max(ks) + 1, W, P, fuse, attention, args.capacity)
            rows += cases(runner, cfg, spec, device, ns, ks, W, P, peak, args.reps, attention)
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:  # the same case under the other attention, side by side
        twin = next((t for t in rows if t is not r and "error" not in t and "error" not in r and t["attention"] == "sdpa"
                     and (t["k"], t["n"], t["P"]) == (r["k"], r["n"], r["P"])), None)
        if twin is not None and r["attention"].startswith("flex"):
            r["sdpa_over_flex"] = twin["step_ms"] / r["step_ms"]
    rows = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "shape": shape, "dtype": str(dtype), "W": W, "prefixes": prefixes, "peak": peak, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "capacity": args.capacity,
            "counting": "rows = n*K*W queries per step; solo = n one-request steps"}
    (args.out / "batch_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| attention | key splits | P | k | n | rows/step | step ms | x roofline | n solo ms | batched speed-up | "
             "rows/s | host ms | sdpa / flex |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attention']} |  | {r['P']} | {r['k']} | {r['n']} | failed: {r['error'][:80]} |  |  |  "
                         "|  |  |  |  |")
            continue
        host = "" if r["host_ms"] is None else f"{r['host_ms']:.2f}"
        ratio = f"{r['sdpa_over_flex']:.2f}" if "sdpa_over_flex" in r else ""
        lines.append(f"| {r['attention']} | {r['key_splits'] or ''} | {r['P']} | {r['k']} | {r['n']} | "
                     f"{r['rows_per_step']} | {r['step_ms']:.2f} | "
                     f"{r['x_roofline']:.2f} | {r['solo_ms']:.2f} | {r['speedup_vs_solo']:.2f}x | {r['rows_per_s']:.0f} | "
                     f"{host} | {ratio} |")
    (args.out / "batch_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        first = (rows[0]["attention"], rows[0]["P"])  # the first attention and prefix
        for k in ks:
            pts = [r for r in rows if "error" not in r and r["k"] == k and (r["attention"], r["P"]) == first]
            ax.plot([r["n"] for r in pts], [r["n"] / r["step_ms"] * 1e3 for r in pts], "o-",
                    label=f"k={k}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests n")
        ax.set_ylabel("LoPA iterations per second (all requests)")
        ax.set_title(f"{shape}, W={W}, P={rows[0]['P']}, {rows[0]['attention']}, {meta['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "batch_throughput.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
