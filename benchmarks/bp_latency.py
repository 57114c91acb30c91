"""Branch Parallel: time per LoPA iteration on 1..N ranks in the same run (issue 17), the share of each phase,
bytes per commit, the two-phase protocol against the single-phase variant, and token identity N vs 1.

Each case decodes one request through the engine (load_model's path: RunnerConfig(branch_parallel=N), CUDA
graphs and fused kernels on a GPU) at a model shape with random weights (the same seed on every rank), prompt
of P random ids, lopa over the threshold window (block_size = W, so every forward verifies K = k+1 branches
of a W-column window). With random weights nothing passes tau, so each branch fills its top-1 position per
iteration and the shapes stay fixed; an iteration's time is the request's decode seconds / decode forwards,
after one warm-up request (graph capture). Phases come from the engine's Branch Parallel counters (rank 0;
engine.bp, runner/group.py), per decode iteration; on a GPU they are timed with a device sync at the end of
each phase (group.sync_timers), so their sum is close to the iteration but the iteration itself is timed
without those syncs in a separate request.

    python benchmarks/bp_latency.py --devices 1,2 --out benchmarks/results/        # GPUs: Dream-7B, bf16 + fp8
    python benchmarks/bp_latency.py --tiny --devices 1,2 --out /tmp/x              # CPU smoke test (gloo)
    python benchmarks/bp_latency.py --devices 1 --one-rank-group --out /tmp/x      # + the NCCL path on one GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_latency import SHAPES  # noqa: E402

from lopa import RunnerConfig  # noqa: E402
from lopa.api import build_model  # noqa: E402
from lopa.config import decode_config  # noqa: E402
from lopa.decoding.base import ModelSpec  # noqa: E402
from lopa.models.config import ModelConfig  # noqa: E402
from lopa.models.loader import LoadedModel  # noqa: E402
from lopa.models.transformer import Transformer  # noqa: E402
from lopa.runner import launch  # noqa: E402

PHASES = ("prepare", "forward", "gather", "select", "commit")


@dataclass(frozen=True)
class RandomSource:
    """Random weights at a named shape, identical on every rank (same seed, same device type)."""

    shape: str
    seed: int = 0

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        cfg = ModelConfig(**SHAPES[self.shape])
        torch.manual_seed(self.seed)
        with torch.device(device):
            model = Transformer(cfg).to(dtype).eval()
        spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
        return LoadedModel(model, None, cfg, spec)


def decode(model, prompt: list[int], k: int, W: int, gen: int):
    cfg = decode_config(None, "dream", strategy="lopa", base="threshold", k=k, block_size=W, gen_length=gen,
                        tau=0.9)
    seq = model.engine.prepare(prompt, cfg)
    with torch.inference_mode():
        (out,) = model.engine.generate([seq])
    return out


def run_cases(model, n: int, precision: str, mode: str, args, prompts) -> list[dict]:
    rows = []
    group = model.runner.group
    for W in args.windows:
        for k in args.ks:
            gen = args.gen or 2 * W
            decode(model, prompts[W], k, W, gen)  # warm-up: graphs captured
            out = decode(model, prompts[W], k, W, gen)  # timed without phase syncs
            iteration = out.stats.decode_s / out.stats.decode_forwards
            group.sync_timers = True
            before = model.engine.bp.as_dict()
            timed = decode(model, prompts[W], k, W, gen)
            after = model.engine.bp.as_dict()
            group.sync_timers = False
            its = timed.stats.decode_forwards
            delta = {key: after[key] - before[key] for key in after if key != "bytes_per_commit"}
            row = dict(devices=n, k=k, W=W, P=args.prefix, precision=precision, commit=mode,
                       iteration_ms=iteration * 1e3, decode_forwards=out.stats.decode_forwards,
                       token_ids=out.token_ids,
                       **{f"{p}_ms": delta[f"{p}_s"] / its * 1e3 for p in PHASES},
                       gather_bytes_per_step=delta["gather_bytes"] / max(delta["gathers"], 1),
                       bytes_per_commit=delta["commit_bytes"] / max(delta["broadcasts"], 1),
                       broadcasts_per_step=delta["broadcasts"] / its, gathers_per_step=delta["gathers"] / its)
            total = sum(row[f"{p}_ms"] for p in PHASES)
            row.update({f"{p}_share": row[f"{p}_ms"] / total for p in PHASES})
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "token_ids"}), flush=True)
    return rows


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, gloo ranks")
    ap.add_argument("--shape", default="dream-7b")
    ap.add_argument("--devices", default="1,2", help="rank counts, each run in this process in turn")
    ap.add_argument("--ks", default="3,7,10,15")
    ap.add_argument("--windows", default="32,64")
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--gen", type=int, default=0, help="generated positions per request (default 2*W)")
    ap.add_argument("--precisions", default="bf16,fp8", help="bf16 (float32 on a CPU) and/or fp8 decoder Linears")
    ap.add_argument("--commits", default="broadcast,local", help="Commit-Winner-Cache modes for N > 1")
    ap.add_argument("--one-rank-group", action="store_true", help="also run N = 1 through a one-rank BranchGroup "
                    "(its NCCL collectives on a GPU), beside the single-process LocalGroup")
    args = ap.parse_args()
    args.ks = [int(x) for x in args.ks.split(",")]
    args.windows = [int(x) for x in args.windows.split(",")]
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    shape = "tiny" if args.tiny else args.shape
    vocab = SHAPES[shape]["vocab_size"] - 2
    gen = torch.Generator().manual_seed(0)
    prompts = {W: torch.randint(0, vocab, (args.prefix,), generator=gen).tolist() for W in args.windows}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), shape=shape,
                command="benchmarks/bp_latency.py " + " ".join(sys.argv[1:]),
                counting="iteration = decode seconds / decode forwards of one request (prefill apart); phases per "
                         "decode iteration from rank 0's engine.bp, timed with a device sync after each phase")
    runs = [(int(x), False) for x in args.devices.split(",")]
    if args.one_rank_group:
        runs.insert(1 if runs and runs[0][0] == 1 else 0, (1, True))
    for n, one_rank_group in runs:
        for precision in args.precisions.split(","):
            if precision == "fp8" and cuda and torch.cuda.get_device_capability() < (8, 9):
                continue
            for mode in (args.commits.split(",") if n > 1 else ["broadcast"]):
                runner = RunnerConfig(device=device, dtype="bfloat16" if cuda else "float32", max_num_seqs=1,
                                      quantize="fp8" if precision == "fp8" else None, branch_parallel=n,
                                      bp_commit=mode)
                group = launch.start(1, torch.device(device), runner.bp_timeout_s, mode, False, None) \
                    if one_rank_group else None
                model = build_model(RandomSource(shape), runner, group, name=Path(f"random-{shape}"))
                try:
                    for row in run_cases(model, n, precision, mode, args, prompts):
                        rows.append({**row, "group": "one-rank " + group.dist.get_backend() if group else
                                     ("local" if n == 1 else "spawned")})
                finally:
                    model.close()
                    del model
                    if cuda:
                        torch.cuda.empty_cache()
                (args.out / "bp_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    one = {(r["k"], r["W"], r["precision"]): r for r in rows if r["group"] == "local"}
    for r in rows:
        base = one.get((r["k"], r["W"], r["precision"]))
        r["tokens_equal_1"] = None if base is None else r["token_ids"] == base["token_ids"]
        r["speedup_vs_1"] = None if base is None else base["iteration_ms"] / r["iteration_ms"]
    (args.out / "bp_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, shape {shape}, "
             f"P={args.prefix}; {meta['counting']}", "",
             "| N | group | precision | commit | k | W | ms/iteration | x vs 1 | prepare | forward | gather | select "
             "| commit | kB/commit | broadcasts/step | tokens = N=1 |", "|" + "---|" * 16]
    for r in rows:
        share = " | ".join(f"{r[p + '_ms']:.3f} ({r[p + '_share']:.0%})" for p in PHASES)
        speed = "" if r["speedup_vs_1"] is None else f"{r['speedup_vs_1']:.2f}x"
        lines.append(f"| {r['devices']} | {r['group']} | {r['precision']} | {r['commit']} | {r['k']} | {r['W']} | "
                     f"{r['iteration_ms']:.3f} | {speed} | {share} | {r['bytes_per_commit'] / 1e3:.1f} | "
                     f"{r['broadcasts_per_step']:.2f} | {r['tokens_equal_1']} |")
    (args.out / "bp_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted({(r["devices"], r["precision"], r["commit"], r["W"]) for r in rows}):
            case = [r for r in rows if (r["devices"], r["precision"], r["commit"], r["W"]) == key]
            ax.plot([r["k"] for r in case], [r["iteration_ms"] for r in case], marker="o",
                    label=f"N={key[0]} {key[1]} {key[2]} W={key[3]}")
        ax.set_xlabel("k (lookahead branches)")
        ax.set_ylabel("ms per LoPA iteration")
        ax.set_title(f"Branch Parallel, {shape}, {meta['device']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / "bp_latency.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
