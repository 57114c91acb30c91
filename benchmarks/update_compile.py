"""What the compiled update costs a first start (issue 25), per set of Inductor options, beside the step it buys.

engine/device.compiled_update's four phases (decoding/batched.py) are called as DevicePath.warmup calls them: every
(B bucket, query bucket) key of a warm-up with --max-tokens padded queries and --slots slots (B x Qb <= max
tokens), on free slots (every int field zero), in order. Each variant runs in a fresh process with empty on-disk
kernel caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) of its own: a first start. Reported per variant: the
warm-up's seconds, how many torch.compile graphs it made, the keys that compiled (seconds each), dynamo's seconds
per compile stage (in the JSON); then the
warm update of n requests mid-decode (lopa k=7; benchmarks/device_update.py's states) captured in one CUDA graph,
median ms of its replays, and whether every slot reads back equal to the eager update's (``equal``: a digest of
every slot read back into its request's host state, benchmarks/device_update.py's state_of).

Variants (--variants, comma-separated):
    eager             batched's own functions (no compile): the reference and the eager step
    default           device.compiled_update with its Inductor options (device._inductor_options), dynamic slots
    no autotune       + Inductor "triton.autotune_pointwise": False (one launch configuration per pointwise kernel)
    deterministic     + "deterministic": True (no on-device benchmarking of kernel configurations)
    both              the two above
    two rows          default, every key of one request called on two rows instead (a size of 1 specializes)
    static slots      default with every dimension of the slots' tensors marked static (torch._dynamo.mark_static);
                      the step's sizes stay dynamic
    static slots + two rows   both
    static widths     default with the slots' widths that no request or model changes marked static (the lookahead
                      capacity, the field counts): what DevicePath.warmup does
A repeated variant is a second start: a fresh process on the first one's caches (what a restart costs).

    PYTHONPATH=src python3 benchmarks/update_compile.py --out benchmarks/results/update_compile_h100   # a GPU
    PYTHONPATH=src python3 benchmarks/update_compile.py --device cpu --backend eager --max-tokens 64 --slots 2 \
        --capacity 256 --variants "static widths,static widths" --out /tmp/x              # CPU smoke test

On a CPU with Inductor (--device cpu, the default backend; about 2 minutes a variant on 2 cores) the update's
size guards and so its recompiles are the GPU's: with TORCH_LOGS=recompiles it names the guard behind each.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lopa.decoding import batched
from lopa.decoding.slots import DEVICE_SCORES, Slots
from lopa.engine import device
from lopa.engine.device import widths
from lopa.runner.graphs import compiles, query_bucket, warmup_shapes

from device_update import SPEC, restore, snapshot, state_of, states, time_cuda
from step_latency import git_commit

OPTIONS = {"eager": None, "default": {}, "no autotune": {"triton.autotune_pointwise": False},
           "deterministic": {"deterministic": True},
           "both": {"triton.autotune_pointwise": False, "deterministic": True}, "two rows": {}, "static slots": {},
           "static slots + two rows": {}, "static widths": {}}


def update(ops, st: Slots, B: int, Qb: int, preds: torch.Tensor, eos: torch.Tensor, budget: torch.Tensor) -> None:
    """The update's phases in DevicePath._update's order (the forward's predictions given)."""
    Wm, R = widths(Qb, st.look.shape[1])
    ops.queries(st, B, Qb, SPEC.mask_id)
    ops.accept(st, B, preds[:B, :Qb], Wm, R, ("mean",), SPEC.mask_id, eos, 0)
    ops.propose(st, B, SPEC.mask_id, budget, Wm, 0)
    ops.answer_ready(st, B, SPEC.mask_id, Wm, 0)


def child(variant: str, args) -> dict:
    dev = torch.device(args.device)
    extra = OPTIONS[variant]
    if extra is None:
        ops = batched
    else:
        base = device._inductor_options
        device._inductor_options = lambda: {**base(), **extra}
        ops = device.compiled_update(args.backend)
    eos, budget = torch.tensor(SPEC.eos_ids, device=dev), torch.tensor([-1], device=dev)
    g = torch.Generator().manual_seed(0)
    def fixed(st: Slots) -> None:
        """Mark the variant's static sizes: of the slots, and of the step's constant tensors."""
        if variant == "static widths":  # what the engine marks
            device.mark_fixed_widths(st, budget)
        elif variant.startswith("static slots"):
            for t in (*vars(st).values(), eos, budget):
                torch._dynamo.mark_static(t)
    out: dict = {"variant": variant, "keys": []}
    with torch.inference_mode():
        # the warm-up: free slots, every key in order
        st = Slots.empty(args.slots, args.capacity, args.kc, dev, torch.float32)
        fixed(st)
        preds = torch.zeros(args.slots, args.max_tokens, 3, device=dev)
        t_all, c_all = time.perf_counter(), compiles()
        for B, Qb in warmup_shapes(args.slots, args.capacity, args.max_tokens):
            rows = 2 if "two rows" in variant and B == 1 else B
            st.ints.zero_()
            t, c = time.perf_counter(), compiles()
            update(ops, st, rows, Qb, preds, eos, budget)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out["keys"].append({"B": B, "Qb": Qb, "s": time.perf_counter() - t, "compiles": compiles() - c})
        out["warmup_s"], out["warmup_compiles"] = time.perf_counter() - t_all, compiles() - c_all
        # the warm update of n requests mid-decode
        out["steps"] = {}
        for n in (int(x) for x in args.ns.split(",")):
            reqs = states("lopa", n, 128, 32)
            Qb = query_bucket(max(b.tokens.numel() for _, _, b in reqs))
            st = Slots.empty(n, args.capacity, args.kc, dev, torch.float32)
            fixed(st)
            for b, (strategy, state, batch) in enumerate(reqs):
                st.load(b, strategy, state, batch, DEVICE_SCORES.index("mean"))
            snap = snapshot(st)
            p = torch.stack([torch.randint(10, 90, (n, Qb), generator=g).float(),
                             0.5 + 0.5 * torch.rand(n, Qb, generator=g), torch.rand(n, Qb, generator=g)], -1).to(dev)
            c = compiles()
            ms = replay_ms(lambda: update(ops, st, n, Qb, p, eos, budget), st, snap, args.iters, dev)
            restore(st, snap)
            update(ops, st, n, Qb, p, eos, budget)  # once from the snapshot: the state compared
            out["steps"][n] = {"Qb": Qb, "ms": ms, "compiles": compiles() - c,
                               "state": hashlib.sha1(json.dumps(state_of(st, n, reqs)).encode()).hexdigest()}
    from torch._dynamo.utils import compilation_time_metrics
    out["compile_times"] = {name: sum(v) for name, v in compilation_time_metrics.items()}  # s per dynamo_timed stage
    return out


def replay_ms(run, st: Slots, snap: dict, iters: int, dev: torch.device) -> float:
    """Median ms of ``run`` captured in one CUDA graph (device_update.time_cuda); on a CPU run eagerly, the slots
    restored before each."""
    if dev.type == "cuda":
        return time_cuda([run], st, snap, iters)["total"]
    restore(st, snap)
    run()  # untimed: a first call compiles
    times = []
    for _ in range(iters):
        restore(st, snap)
        t = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def markdown(meta: dict, rows: list[dict], ns: list[str]) -> str:
    lines = [f"The compiled update's first start (each variant a fresh process, empty kernel caches), "
             f"{meta['device']}, warm-up of {meta['keys']} keys ({meta['slots']} slots, max {meta['max_tokens']} "
             f"padded queries, slots {meta['capacity']} wide, kc {meta['kc']}), backend {meta['backend']}, commit "
             f"{meta['commit']}, torch {meta['torch']}, "
             f"{meta['date']}. Warm: lopa k=7 requests mid-decode, the update in one CUDA graph, median ms of "
             f"{meta['iters']} replays; equal: every slot reads back as after the eager update.", "",
             "| variant | warm-up s | compiles | keys compiling (B, Qb: s) | "
             + " | ".join(f"n={n} ms" for n in ns) + " | equal |",
             "|---|---|---|---|" + "---|" * len(ns) + "---|"]
    ref = rows[0]["steps"]
    for r in rows:
        keys = ", ".join(f"{k['B']}x{k['Qb']}: {k['s']:.1f}" for k in r["keys"] if k["compiles"])
        equal = all(r["steps"][n]["state"] == ref[n]["state"] for n in ns)
        lines.append(f"| {r['variant']} | {r['warmup_s']:.1f} | {r['warmup_compiles']} | {keys or '-'} | "
                     + " | ".join(f"{r['steps'][n]['ms']:.3f}" for n in ns) + f" | {equal} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="eager,default,no autotune,deterministic,both,two rows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slots", type=int, default=8, help="the pool's slots (max_num_seqs)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="RunnerConfig.max_num_batched_tokens")
    ap.add_argument("--capacity", type=int, default=8192, help="slot positions (the warm-up sizes them for the "
                    "context)")
    ap.add_argument("--kc", type=int, default=64, help="lookaheads a slot holds (RunnerConfig.max_lookahead)")
    ap.add_argument("--ns", default="1,8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend (\"eager\": dynamo's tracing alone, "
                    "a CPU smoke test; Inductor's options then do not apply)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/update_compile"))
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    variants = args.variants.split(",")
    if variants[0] != "eager":
        variants.insert(0, "eager")  # the reference of ``equal``
    rows, caches = [], {}
    for variant in variants:
        again = variant in caches
        cache = caches.setdefault(variant, tempfile.mkdtemp(prefix="lopa_update_compile_"))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", variant] + sys.argv[1:], env=env,
                              stdout=subprocess.PIPE, text=True)
        result = next((line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode or result is None:
            sys.exit(f"variant {variant!r} failed (exit {proc.returncode})")
        rows.append({**json.loads(result), "process_s": time.perf_counter() - t})
        if again:
            rows[-1]["variant"] += ", second start"
        top = sorted(rows[-1]["compile_times"].items(), key=lambda kv: -kv[1])[:8]
        print(f"{rows[-1]['variant']}: warm-up {rows[-1]['warmup_s']:.1f} s, {rows[-1]['warmup_compiles']} compiles; "
              + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    ns = [str(n) for n in args.ns.split(",")]
    for r in rows:
        r["steps"] = {str(n): v for n, v in r["steps"].items()}
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU", "backend": args.backend,
            "slots": args.slots,
            "max_tokens": args.max_tokens, "capacity": args.capacity, "kc": args.kc, "iters": args.iters,
            "keys": len(warmup_shapes(args.slots, args.capacity, args.max_tokens)), "commit": git_commit(),
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update_compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "update_compile.md").write_text(markdown(meta, rows, ns))
    print(markdown(meta, rows, ns))


if __name__ == "__main__":
    main()
