"""The device path's update alone (issue 26): decoding/batched.py's queries, accept, propose and answer_ready for n
requests on slots --width positions wide, no model forward, this tree's code beside another commit's, in one run.

The requests (lopa k=7 or d2f over the d2f base, GSM8K-like prompt lengths) are decoded on the host by their
strategies against a deterministic oracle (no model) for a few steps each, so that every one is mid-decode with
its own window; their states are loaded into ``Slots`` of the given width with the warmed path's lookahead
capacity (--kc, RunnerConfig.max_lookahead) and each variant times the same update from the same snapshot (restored
before every repetition, not timed), with the warmed static path's shapes: Qb = the query bucket of the step's
largest forward and Wm = Qb window columns; the branch rows R depend on the variant:

    span       this tree: the update over each slot's span (batched.Geometry), R from Qb (engine/device.py: widths)
    span, R=K  the same with R = the step's largest K (what a row bucket in the graph key would buy)
    compiled   (--compiled) "span" with each of the four calls through torch.compile (dynamic shapes): what fusing
               the update's few hundred small kernels would buy (an experiment: the engine does not compile it)
    old        --against's decoding/batched.py and slots.py (default: the commit before the span change), read with
               git show into temporary modules: every per-position tensor over the whole slot width, R = min(kc +
               1, Qb)

After one update from the snapshot every variant's slot rows are read back into the requests' host states
(Slots.store, each variant its own) and compared with the old one's (canvas, blocks, lengths, EOS, pending
scored set and lookaheads, predictions' flags, the next batch): ``equal``. Times: median ms over --iters
repetitions. On the CPU each phase eagerly, a proxy for the GPU's figure; with --device cuda the whole update
captured in one CUDA graph, as the device path runs it, its replays timed by CUDA events.

    PYTHONPATH=src python3 benchmarks/device_update.py --out benchmarks/results/device_update_cpu
    PYTHONPATH=src python3 benchmarks/device_update.py --device cuda --ns 1,8,32,64 \
        --out benchmarks/results/device_update_gpu

Without git history (a copy of the tree), first put the old modules in a folder and pass --old-dir:

    mkdir -p /tmp/old && for f in batched slots; do git show 443d81f:src/lopa/decoding/$f.py > /tmp/old/$f.py; done
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import inspect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from lopa.config import DecodeConfig
from lopa.decoding import batched, make_strategy
from lopa.decoding.base import ModelSpec, Predictions
from lopa.decoding.slots import DEVICE_SCORES, Slots
from lopa.engine.device import widths
from lopa.runner.graphs import QUERY_BUCKETS

from step_latency import git_commit

SPEC = ModelSpec(mask_id=99, eos_ids=(98,), max_length=8192, vocab_size=100)
STRATEGIES = {"lopa": dict(strategy="lopa", k=7), "d2f": dict(strategy="d2f")}
AGAINST = "443d81f"  # the whole-width update


def old_modules(rev: str, folder: str, old_dir: Path | None):
    """decoding/batched.py and slots.py at ``rev`` (or as files in ``old_dir``: a copy without git history),
    imported inside lopa.decoding (their relative imports resolve there; the old batched reads the old Slots)."""
    modules = []
    for name in ("slots", "batched"):
        path = Path(folder) / f"_{name}_old.py"
        text = (old_dir / f"{name}.py").read_text() if old_dir else subprocess.run(
            ["git", "show", f"{rev}:src/lopa/decoding/{name}.py"], check=True, capture_output=True, text=True).stdout
        path.write_text(text.replace("from .slots import", "from ._slots_old import"))
        spec = importlib.util.spec_from_file_location(f"lopa.decoding._{name}_old", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[1], modules[0].Slots


def oracle(row: torch.Tensor, start: int, cols: torch.Tensor):
    """A deterministic stand-in for the model: per column a token, its probability and confidence."""
    pos = start + cols
    h = (pos * 31 + int((row == SPEC.mask_id).sum()) * 17) % 97
    return 10 + h % 80, 0.5 + 0.5 * (h % 7) / 7, (h % 11) / 11


def states(name: str, n: int, gen_length: int, block_size: int):
    """n (strategy, state, pending batch), each a few host steps into its decode."""
    out = []
    for i in range(n):
        cfg = DecodeConfig(**STRATEGIES[name], gen_length=gen_length, block_size=block_size, tau=0.9)
        strategy = make_strategy(cfg, SPEC)
        state = strategy.start([1 + (i * 7 + j) % 90 for j in range(80 + (i * 37) % 160)])
        batch = strategy.propose(state)
        for _ in range(3 + 2 * (i % 4)):
            if batch.prefill:
                strategy.accept(state, batch, None)
            else:
                rows = [oracle(r, batch.start, batch.logit_cols) for r in batch.tokens]
                tok, prob, conf = (torch.stack([r[j] for r in rows]) for j in range(3))
                strategy.accept(state, batch, Predictions(tok, prob.float(), conf.float()))
            batch = strategy.propose(state)
        out.append((strategy, state, batch))
    return out


def snapshot(st) -> dict:
    return {name: getattr(st, name).clone() for name in st.__dataclass_fields__}


def restore(st, snap: dict) -> None:
    for name, value in snap.items():
        getattr(st, name).copy_(value)


PHASES = ("queries", "accept", "propose", "answer_ready")


def phases(module, st, n: int, preds, Qb: int, Wm: int, R: int) -> list:
    """The update's four calls (the old module's propose and answer_ready take no Wm)."""
    eos, budget = torch.tensor(SPEC.eos_ids, device=preds.device), torch.tensor([-1], device=preds.device)
    span = len(inspect.signature(module.propose).parameters) > 4
    return [lambda: module.queries(st, n, Qb, SPEC.mask_id),
            lambda: module.accept(st, n, preds, Wm, R, ("mean",), SPEC.mask_id, eos),
            lambda: module.propose(st, n, SPEC.mask_id, budget, *([Wm] if span else [])),
            lambda: module.answer_ready(st, n, SPEC.mask_id, *([Wm] if span else []))]


def time_cpu(calls: list, st, snap: dict, iters: int) -> dict:
    """Median ms of each phase, eager."""
    times: dict = {name: [] for name in PHASES}
    for _ in range(iters):
        restore(st, snap)
        for name, run in zip(PHASES, calls):
            t0 = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - t0))
    out = {name: statistics.median(ms) for name, ms in times.items()}
    return {**out, "total": sum(out.values())}


def time_cuda(calls: list, st, snap: dict, iters: int) -> dict:
    """Median ms of the whole update captured in one CUDA graph (as the device path runs it), by CUDA events; the
    snapshot is restored before each replay, outside the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
        for _ in range(2):
            restore(st, snap)
            for run in calls:
                run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for run in calls:
            run()
    times = []
    for _ in range(iters):
        restore(st, snap)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    restore(st, snap)
    graph.replay()  # the state the comparison reads
    return {"total": statistics.median(times)}


def state_of(st, n: int, reqs) -> list:
    """Every slot read back into (a copy of) its host state, as the engine would: the state and pending batch."""
    out = []
    for b, (strategy, state, _) in enumerate(reqs):
        state = copy.deepcopy(state)
        batch = st.store(b, strategy, state)
        out.append((state.canvas.tolist(), [(x.start, x.end, x.fully_active) for x in state.blocks], state.cached,
                    state.rounds, state.eos_at, state.done, state.pending, state.pred_ok.tolist(),
                    None if batch is None else (batch.tokens.tolist(), batch.commit, batch.logit_cols.tolist())))
    return out


def measure_case(name: str, n: int, args, variants: dict) -> dict:
    reqs = states(name, n, args.gen_length, args.block_size)
    K = torch.tensor([b.tokens.shape[0] for _, _, b in reqs])
    W = torch.tensor([b.tokens.shape[1] for _, _, b in reqs])
    Qb = next(q for q in QUERY_BUCKETS if q >= int((K * W).max()))
    g = torch.Generator().manual_seed(0)
    preds = torch.stack([torch.randint(10, 90, (n, Qb), generator=g).float(), 0.5 + 0.5 * torch.rand(n, Qb, generator=g),
                         torch.rand(n, Qb, generator=g)], -1).to(args.device)
    row = {"strategy": name, "n": n, "Qb": Qb, "K": int(K.max()), "W": int(W.max()), "width": args.width}
    results = {}
    for label, (module, slots, R) in variants.items():
        st = slots.empty(n, args.width, args.kc, torch.device(args.device), torch.float32)
        for b, (strategy, state, batch) in enumerate(reqs):
            st.load(b, strategy, state, batch, DEVICE_SCORES.index("mean"))
        snap = snapshot(st)
        R = {"all": min(args.kc + 1, Qb), "bound": widths(Qb, args.kc)[1], "K": int(K.max())}[R]
        calls = phases(module, st, n, preds, Qb, Qb, R)
        if args.device == "cuda":
            row[label] = time_cuda(calls, st, snap, args.iters)
        else:
            restore(st, snap)
            for run in calls:  # once untimed: the first call of each op warms up
                run()
            row[label] = time_cpu(calls, st, snap, args.iters)
        results[label] = state_of(st, n, reqs)  # after one update from the snapshot
        row[label]["R"] = R
    ref = results["old"]
    row["equal"] = all(r == ref for r in results.values())
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    labels = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    phased = "accept" in rows[0][labels[0]]  # the CPU times each phase; a GPU the captured whole
    lines = [f"The device update alone (queries + accept + propose + answer_ready, no forward), {meta['device']}, "
             f"{meta['threads']} thread(s), slots {meta['width']} positions wide, kc {meta['kc']}, gen_length "
             f"{meta['gen_length']}, block_size {meta['block_size']}, commit {meta['commit']} against "
             f"{meta['against']}, {meta['date']}. Median ms over {meta['iters']} repetitions.", "",
             "| strategy | n | Qb (K, W) | " + " | ".join(f"{v} ms" + (" (accept / propose)" if phased else "")
                                                       for v in labels)
             + " | old / span | equal |", "|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for r in rows:
        cells = [f"{r[v]['total']:.2f}" + (f" ({r[v]['accept']:.2f} / {r[v]['propose']:.2f})" if "accept" in r[v]
                                           else "") for v in labels]
        lines.append(f"| {r['strategy']} | {r['n']} | {r['Qb']} ({r['K']}, {r['W']}) | " + " | ".join(cells)
                     + f" | {r['old']['total'] / r['span']['total']:.1f}x | {r['equal']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1,8,32")
    ap.add_argument("--strategies", default="lopa,d2f")
    ap.add_argument("--width", type=int, default=8192, help="slot positions (the warm-up sizes them for the context)")
    ap.add_argument("--kc", type=int, default=64, help="lookaheads a slot holds (RunnerConfig.max_lookahead)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (phases timed eagerly) or cuda (the update captured in "
                    "one CUDA graph, replays timed by CUDA events: the GPU figure)")
    ap.add_argument("--against", default=AGAINST, help="the commit whose decoding/batched.py is the old update")
    ap.add_argument("--old-dir", type=Path, default=None,
                    help="a folder holding that commit's batched.py and slots.py (where git history is absent)")
    ap.add_argument("--compiled", action="store_true", help="add the variant with the four calls torch.compile'd")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/device_update"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else cpu, "threads": args.threads,
            "width": args.width, "kc": args.kc, "gen_length": args.gen_length, "block_size": args.block_size,
            "iters": args.iters, "commit": git_commit(), "against": args.against, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        variants = {"old": (*old_modules(args.against, folder, args.old_dir), "all"), "span": (batched, Slots, "bound"),
                    "span, R=K": (batched, Slots, "K")}
        if args.compiled:
            # module-level floats (budget.FILL_HALVING, FLAT_SPREAD) would become 0-dim CPU tensor inputs under
            # dynamic=True, which Inductor's CUDA kernels cannot read ("cpu tensor?"): keep them constants
            torch._dynamo.config.specialize_float = True
            fused = types.SimpleNamespace(**{name: torch.compile(getattr(batched, name), dynamic=True)
                                             for name in PHASES})
            variants["compiled"] = (fused, Slots, "bound")
        for name in args.strategies.split(","):
            for n in (int(x) for x in args.ns.split(",")):
                rows.append(measure_case(name, n, args, variants))
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_update.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "device_update.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
