"""A whole forward of a step of requests of different widths: the static path's padded rows (ModelRunner.body)
against the flat query axis (ModelRunner.flat_body), side by side in one run, both with the head.

    padded  what the engine runs: every request row padded to the widest one's query bucket, [n, Qb]; each row reads
            its own slot's keys under step_block_mask
    flat    the same rows back to back on ONE query axis of T queries (each request's segment padded only to a
            multiple of --q-tile; T its total rounded up to a query bucket, as engine/device.py keys it;
            runner/step.py: flatten, timed with the forward): the projections, norms, MLP and head run over T rows;
            the attention lays the queries into the padded rows and runs there, as padded's does (cache.FlatView)

On one H100 (docs/benchmarks.md, seventeenth session) flat took 0.70 of padded's time at Dream-7B shape and 1.03-1.2x
at the embedded model's. (The sixteenth session's flat forward attended on the flat axis itself, every slot's keys
as one sequence under a mask of its own: 1.6x slower than the padded rows. That attention is gone.)

A step: n lopa k requests (K = k + 1 rows of W columns each, W cycling through --widths: one to three active D2F
blocks) at prefixes spread over --prefixes, in slots 0..n-1 of a pool of n slots. Both forwards run the model's
runner ops (compiled chains and FlexAttention on a GPU, as load_model's runner sets them), then the head over their
queries (lm_head, float32 softmax, argmax: what the step's batched predict costs per query); their hidden states
are checked on every real query (the script exits non-zero past --tol). On a GPU: the median of CUDA-graph replays
of each whole call (the mask built inside, as the engine's graphs build it).

    PYTHONPATH=src:benchmarks python3 benchmarks/flat_forward.py --out benchmarks/results/flat_forward_h100
    PYTHONPATH=src:benchmarks python3 benchmarks/flat_forward.py --device cpu --tiny --out /tmp/ff   # eager, float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from lopa.decoding.base import ForwardBatch, PredictSpec
from lopa.models.config import ModelConfig
from lopa.models.fused import EAGER, fused_ops
from lopa.models.spec import ModelSpec
from lopa.models.transformer import Transformer
from lopa.runner.graphs import query_bucket, round_up
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import FIELDS, StepItem, flatten, pack, unpack_flat

from step_latency import SHAPES

DEFAULT = dict(model_type="dream", vocab_size=768, hidden_size=256, intermediate_size=768, num_layers=8, num_heads=4,
               num_kv_heads=2, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=4096, mask_token_id=763,
               eos_token_id=760)  # the embedded model's shape (src/lopa/assets/default_model/config.json)


def step_items(n: int, k: int, widths: list[int], prefixes: tuple[int, int], vocab: int) -> list[StepItem]:
    """n lopa k requests in slots 0..n-1: K = k + 1 rows of W columns (W cycling through ``widths``) at prefixes
    spread over [lo, hi)."""
    lo, hi = prefixes
    g = torch.Generator().manual_seed(n * 131 + k)
    items = []
    for i in range(n):
        W = widths[i % len(widths)]
        tokens = torch.randint(0, vocab, (k + 1, W), generator=g)
        P = lo + (i * 97) % max(1, hi - lo)
        items.append(StepItem(i, ForwardBatch(tokens, P, torch.arange(0)), PredictSpec()))
    return items


def run_case(runner: ModelRunner, n: int, k: int, widths, prefixes, q_tile: int, timer) -> dict:
    model = runner.model
    items = step_items(n, k, widths, prefixes, model.config.vocab_size)
    queries = [item.queries for item in items]
    Qb = query_bucket(max(queries))
    T = round_up(query_bucket(sum(round_up(q, q_tile) for q in queries)), q_tile)  # engine/device.py: _flat_queries
    host = torch.empty(n, FIELDS * Qb + 3, dtype=torch.long)
    pack(items, host, runner.spec.mask_id)
    inputs = host.to(runner.device)
    head = lambda h: model.lm_head(h).float().softmax(-1).max(-1)  # noqa: E731 - the per-query head
    padded = lambda: head(runner.body(inputs, 0, runner.pool.capacity, flex=True))  # noqa: E731
    flat_body = lambda: runner.flat_body(inputs, flatten(inputs, T, q_tile, runner.spec.mask_id), T)  # noqa: E731
    flat = lambda: head(flat_body())  # noqa: E731
    with torch.inference_mode():
        hp = runner.body(inputs, 0, runner.pool.capacity, flex=True)
        hf = flat_body()
        start = unpack_flat(flatten(inputs, T, q_tile, runner.spec.mask_id), T)[7]
        ref = torch.cat([hp[b, :q] for b, q in enumerate(queries)])
        got = torch.cat([hf[0, int(start[b]):int(start[b]) + q] for b, q in enumerate(queries)])
        err = float((got - ref).float().norm() / ref.float().norm())
        row = {"n": n, "k": k, "Qb": Qb, "real": sum(queries), "padded": n * Qb, "flat": T, "err": err}
        if timer is not None:
            row["padded_ms"], row["flat_ms"] = timer(padded), timer(flat)
    return row


def columns(timed: bool) -> list[tuple[str, Callable[[dict], str]]]:
    """The table's columns: (header, cell of a row)."""
    cols = [("shape", lambda r: r["shape"]), ("n", lambda r: str(r["n"])), ("k", lambda r: str(r["k"])),
            ("Qb", lambda r: str(r["Qb"])),
            ("queries real / padded / flat", lambda r: f"{r['real']:,} / {r['padded']:,} / {r['flat']:,}"),
            ("rel. err", lambda r: f"{r['err']:.1e}")]
    if timed:
        cols += [("padded ms", lambda r: f"{r['padded_ms']:.3f}"), ("flat ms", lambda r: f"{r['flat_ms']:.3f}"),
                 ("padded / flat", lambda r: f"{r['padded_ms'] / r['flat_ms']:.2f}x")]
    return cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flat_forward"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="default,dream-7b", help="default (the embedded model's) or step_latency.py's")
    ap.add_argument("--tiny", action="store_true", help="the tiny heads, 3 requests, capacity 1024 (a CPU check)")
    ap.add_argument("--ns", default="8,32")
    ap.add_argument("--ks", default="3,7")
    ap.add_argument("--widths", default="32,64,32,64,96", help="each request's window W, cycled")
    ap.add_argument("--prefixes", default="128,640", help="prefix lengths spread over [lo, hi)")
    ap.add_argument("--capacity", type=int, default=2048, help="KV positions a slot (a multiple of 256)")
    ap.add_argument("--q-tile", type=int, default=1, help="the flat layout's segments padded to a multiple of this")
    ap.add_argument("--tol", type=float, default=None, help="largest relative error of the hidden states (default: "
                    "1e-5 in float32, 3e-2 in bfloat16)")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.ns, args.ks, args.capacity, args.prefixes = "tiny", "3", "1,3", 1024, "5,300"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    widths = [int(w) for w in args.widths.split(",")]
    prefixes = tuple(int(p) for p in args.prefixes.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    if args.capacity % 256 or prefixes[1] + (max(ks) + 1) * max(widths) >= args.capacity:
        ap.error("--capacity must be a multiple of 256 and hold the longest prefix and window (and a trash position)")
    timer = None
    if cuda:
        from gemm_rows import median_ms as timer
    tol = args.tol if args.tol is not None else (3e-2 if dtype == torch.bfloat16 else 1e-5)
    rows = []
    for shape in args.shapes.split(","):
        cfg = ModelConfig(**(DEFAULT if shape == "default" else SHAPES[shape]))
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg).to(dtype).eval()
        model.ops = fused_ops(device, dtype) if cuda else EAGER
        spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
        ns = [int(x) for x in args.ns.split(",")]
        runner = ModelRunner(model, spec, device, dtype, max_num_seqs=max(ns), max_positions=args.capacity - 1)
        for n in ns:
            runner.pool = None
            runner.reserve(n, args.capacity - 1)
            runner.pool.kv.normal_()  # the prefixes' keys and values
            for k in ks:
                row = {"shape": shape, **run_case(runner, n, k, widths, prefixes, args.q_tile, timer)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model, runner
        if cuda:
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "torch": torch.__version__,
            "capacity": args.capacity, "widths": args.widths, "prefixes": args.prefixes, "q_tile": args.q_tile,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flat_forward.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = (f"One whole forward + head, padded rows against the flat query axis, capacity {args.capacity}, query "
             f"tile {args.q_tile}, widths {args.widths}, prefixes {args.prefixes}, {meta['device']} ({dtype}), torch "
             f"{torch.__version__}, {meta['date']}")
    cols = columns(timer is not None)
    lines = [title, "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    table = "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]) + "\n"
    (args.out / "flat_forward.md").write_text(table)
    print(table)
    bad = [r for r in rows if not r["err"] <= tol]
    if bad:
        sys.exit(f"the flat forward differs from the padded one past {tol}: "
                 f"{[(r['shape'], r['n'], r['k'], r['err']) for r in bad]}")


if __name__ == "__main__":
    main()
