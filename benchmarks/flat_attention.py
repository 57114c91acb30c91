"""One layer's attention for a step of requests of different widths: the static path's padded rows against a flat
query axis, side by side in one run (the lead for lopa's batched steps: docs/benchmarks.md, fifteenth session).

A lopa k request's forward holds K x W queries (K = k + 1 branches over its W-column window), and the static path
pads every request of a step to the query bucket of the widest one ([n, Qb]): 32 lopa k = 7 requests of 1-3 active
D2F blocks computed 22,426 queries for 12,564 real ones on the embedded model. Two layouts of the same step here:

    padded  what the engine runs: models/fused.py's compiled FlexAttention over [n, Hkv, groups * Qb, D] (the
            query heads of a KV head on the query axis) with step_block_mask(groups), the keys of the n slots
            [n, Hkv, capacity, D]
    flat    each request's K*W queries back to back, its segment padded only to a multiple of the 128-query tile,
            and ONE FlexAttention call over a batch of one: queries [1, Hkv, groups * T, D], the keys of every slot
            laid out [Hkv, slots x capacity, D] (a pool with its KV heads outermost, so a layer's keys are one view),
            and a block mask (flat_block_mask) that lists for each query tile only tiles of its own request's slot:
            the prefix's as full, the one holding the prefix's end and those of the tile's branches' window columns
            as partial (the same lists step_block_mask makes per row, moved to the slot's place)

Both follow step_mask's rule (models/attention.py); the flat outputs are checked against the padded ones on every
real query, and the script exits non-zero past --tol. On a GPU: the median of CUDA-graph replays of each attention
call (each mask built once, its build timed apart), both compiled as the engine compiles FlexAttention (static
lengths; the engine's tiles). Attention is a small part of a step; what the flat axis saves is the per-query work
around it (projections, MLP, norms, the head), in proportion to the query counts the table gives (real / padded /
flat): a projection, not measured here.

    PYTHONPATH=src python3 benchmarks/flat_attention.py --out benchmarks/results/flat_attention_h100
    PYTHONPATH=src python3 benchmarks/flat_attention.py --device cpu --tiny --out /tmp/fa     # eager, float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from lopa.models.attention import _query_tile_spans, step_block_mask
from lopa.models.attention import flat_block_mask as engine_flat_mask
from lopa.runner.graphs import query_bucket, round_up

SHAPES = {"dream-7b": (28, 4, 128), "default": (4, 2, 64), "tiny": (4, 2, 16)}  # query heads, KV heads, head dim
TILE = 128  # FlexAttention's key tiles (and the padded layout's query tiles)


def workload(n: int, k: int, widths: list[int], prefixes: tuple[int, int]) -> tuple[list[int], list[int]]:
    """n requests' windows (K*W queries each, W cycling through ``widths``) and prefix lengths (spread over
    [lo, hi), seeded by the index)."""
    lo, hi = prefixes
    return [(k + 1) * widths[i % len(widths)] for i in range(n)], [lo + (i * 97) % max(1, hi - lo) for i in range(n)]


def padded_layout(queries: list[int], k: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """branch, block [n, Qb] as runner/step.py packs a step (branch-major columns, -1 = padding; full window
    attention: block 0); Qb = the widest request's query bucket."""
    Qb = query_bucket(max(queries))
    branch = torch.full((len(queries), Qb), -1, dtype=torch.long, device=device)
    for i, q in enumerate(queries):
        branch[i, :q] = torch.arange(k + 1, device=device).repeat_interleave(q // (k + 1))
    return branch, torch.zeros_like(branch), Qb


def flat_layout(queries: list[int], q_tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """owner, col [T] (the request of each flat query and its index among the request's queries) and the segments'
    starts [n]: request r's queries at starts[r] + 0.., its segment padded to a multiple of the query tile (so no
    query tile holds two requests); T = the segments' total."""
    segments = [round_up(q, q_tile) for q in queries]
    starts = torch.tensor([0] + segments[:-1], device=device).cumsum(0)
    owner = torch.repeat_interleave(torch.arange(len(queries), device=device), torch.tensor(segments, device=device))
    col = torch.arange(len(owner), device=device) - starts[owner]
    return owner, col, starts, sum(segments)


def flat_block_mask(P: torch.Tensor, slot: torch.Tensor, branch: torch.Tensor, block: torch.Tensor,
                    owner: torch.Tensor, col: torch.Tensor, capacity: int, slots: int, groups: int, q_tile: int):
    """The step's mask on the flat query axis (queries [groups * T]: head g's T queries after head g-1's; keys: the
    pool's slots one after another, [slots * capacity]), as a FlexAttention BlockMask built on the device. Request r
    (slot slot[r], prefix P[r], its padded layout's branch / block [n, Qb]) owns the flat queries with owner == r, its
    col-th query each. A real query sees its slot's prefix and the keys its own branch's columns wrote this step
    (step_mask's rule); a padding query sees key 0 only (padding outputs are never read). Query tiles of ``q_tile``
    queries (a divisor of TILE: small windows waste less), key tiles of TILE."""
    from torch.nn.attention.flex_attention import BlockMask

    n, Qb = branch.shape
    T = owner.shape[0]
    nk, n_q = capacity // TILE, groups * T // q_tile
    qc = col.clamp(max=Qb - 1)
    real = (col < Qb) & (branch[owner, qc] >= 0)  # [T]

    def mask_mod(b, h, i, kv):
        t = i % T
        r, q = owner[t], qc[t]
        s = kv // capacity
        rel = kv - s * capacity - P[r]
        src = rel.clamp(0, Qb - 1)
        own = (rel >= 0) & (rel < Qb) & (branch[r, src] == branch[r, q]) & (block[r, src] <= block[r, q])
        return (real[t] & (s == slot[r]) & ((rel < 0) | own)) | (~real[t] & (kv == 0))

    # [n, Qb]: the first / last key tile (within the slot) of each padded query's branch run, as step_block_mask
    # reads them per 128-query tile; here per flat query tile
    lo_q, hi_q = _query_tile_spans(P, branch, 1, 1, Qb)  # tile size 1: each query's own span (keys, not tiles)
    t0 = torch.arange(n_q, device=P.device) * q_tile % T  # each query tile's first flat query
    tt = t0[:, None] + torch.arange(q_tile, device=P.device)  # [n_q, q_tile]
    ok = real[tt]
    r = owner[t0]  # [n_q] the tile's request
    lo = torch.where(ok, lo_q[owner[tt], qc[tt]], torch.iinfo(torch.int32).max // 2).amin(-1) // TILE
    hi = torch.where(ok, hi_q[owner[tt], qc[tt]], -TILE).amax(-1) // TILE
    empty = ~ok.any(-1)
    hold = (P[r] // TILE).to(torch.int32)  # the tile holding the prefix's end: partial
    start = torch.maximum(lo, hold + 1)
    hi = hi.clamp(max=nk - 1)
    base = (slot[r] * nk).to(torch.int32)[:, None]
    j = torch.arange(slots * nk, device=P.device, dtype=torch.int32)
    count = torch.where(empty, 1, 1 + (hi - start + 1).clamp(min=0))
    partial = torch.where(empty[:, None], 0, base + torch.where(j == 0, hold[:, None], start[:, None] + j - 1)
                          .clamp(0, nk - 1))
    full_count = torch.where(empty, 0, hold)
    full = base + j.clamp(max=nk - 1)
    as4 = lambda x: x.to(torch.int32)[None, None].contiguous()  # noqa: E731 - [1, 1, n_q(, tiles)]
    return BlockMask.from_kv_blocks(as4(count), as4(partial), as4(full_count), as4(full), BLOCK_SIZE=(q_tile, TILE),
                                    mask_mod=mask_mod, seq_lengths=(groups * T, slots * capacity))


def run_case(n, k, widths, prefixes, capacity, shape, q_tile, device, dtype, flex_padded, flex_flat, timer) -> dict:
    H, HKV, D = SHAPES[shape]
    groups = H // HKV
    queries, Ps = workload(n, k, widths, prefixes)
    g = torch.Generator(device="cpu").manual_seed(n * 131 + k)
    branch, block, Qb = padded_layout(queries, k, device)
    P = torch.tensor(Ps, device=device)
    q = torch.randn(n, H, Qb, D, generator=g).to(device, dtype)  # [n, H, Qb, D]
    kv = torch.randn(2, n, HKV, capacity, D, generator=g).to(device, dtype)  # slots, as the engine's pool
    owner, col, starts, T = flat_layout(queries, q_tile, device)
    slot = torch.arange(n, device=device)
    # the same numbers in the flat layout: queries [1, H, T, D]; keys [Hkv, n * capacity, D] (KV heads outermost)
    qf = torch.zeros(1, H, T, D, device=device, dtype=dtype)
    for r, Q in enumerate(queries):
        qf[0, :, starts[r]:starts[r] + Q] = q[r, :, :Q]
    # [1, Hkv, n*cap, D] each, apart: each at its own buffer's start, so a compile without Inductor's alignment
    # assumption (flex_flat below) still sees both aligned
    kf, vf = (kv[i].permute(1, 0, 2, 3).reshape(1, HKV, n * capacity, D).contiguous() for i in (0, 1))
    with torch.inference_mode():
        pm = step_block_mask(P, branch, block, capacity, groups=groups)
        fm = flat_block_mask(P, slot, branch, block, owner, col, capacity, n, groups, q_tile)
        padded = lambda: flex_padded(q.reshape(n, HKV, groups * Qb, D), kv[0], kv[1], block_mask=pm)  # noqa: E731
        flat = lambda: flex_flat(qf.reshape(1, HKV, groups * T, D), kf, vf, block_mask=fm)  # noqa: E731
        # the same flat queries over the engine's slot-major pool, as one key head (no copy of the keys), under the
        # engine's own flat mask (models/attention.py)
        qc = col.clamp(max=Qb - 1)
        real = (col < Qb) & (branch[owner, qc] >= 0)
        sm = engine_flat_mask(slot, P, starts, torch.tensor(queries, device=device), owner,
                              torch.where(real, branch[owner, qc], -1), torch.where(real, block[owner, qc], 0), n,
                              capacity, HKV, groups=groups, q_tile=q_tile, size=TILE)
        ks, vs = (kv[i].reshape(1, 1, n * HKV * capacity, D) for i in (0, 1))
        slots = lambda: flex_flat(qf.reshape(1, HKV, groups * T, D), ks, vs, block_mask=sm,  # noqa: E731
                                  enable_gqa=True)
        out_p = padded().view(n, H, Qb, D)
        ref = torch.cat([out_p[r, :, :Q] for r, Q in enumerate(queries)], 1)  # [H, sum Q, D] the real queries

        def error(out: torch.Tensor) -> float:
            out = out.view(1, H, T, D)
            got = torch.cat([out[0, :, starts[r]:starts[r] + Q] for r, Q in enumerate(queries)], 1)
            return float((got - ref).float().norm() / ref.float().norm())

        err = max(error(flat()), error(slots()))
        row = {"n": n, "k": k, "Qb": Qb, "real": sum(queries), "padded": n * Qb, "flat": T, "err": err,
               "tiles_padded": int((pm.kv_num_blocks + pm.full_kv_num_blocks).sum()),
               "tiles_flat": int((fm.kv_num_blocks + fm.full_kv_num_blocks).sum())}
        if timer is not None:
            row["padded_ms"], row["flat_ms"], row["slots_ms"] = timer(padded), timer(flat), timer(slots)
            row["mask_padded_ms"] = timer(lambda: step_block_mask(P, branch, block, capacity, groups=groups))
            row["mask_flat_ms"] = timer(lambda: flat_block_mask(P, slot, branch, block, owner, col, capacity, n,
                                                                groups, q_tile))
    return row


def columns(timed: bool) -> list[tuple[str, Callable[[dict], str]]]:
    """The columns flat_attention.py's and flat_forward.py's tables share: (header, cell of a row)."""
    cols = [("n", lambda r: str(r["n"])), ("k", lambda r: str(r["k"])), ("Qb", lambda r: str(r["Qb"])),
            ("queries real / padded / flat", lambda r: f"{r['real']:,} / {r['padded']:,} / {r['flat']:,}"),
            ("rel. err", lambda r: f"{r['err']:.1e}")]
    if timed:
        cols += [("padded ms", lambda r: f"{r['padded_ms']:.3f}"), ("flat ms", lambda r: f"{r['flat_ms']:.3f}"),
                 ("padded / flat", lambda r: f"{r['padded_ms'] / r['flat_ms']:.2f}x")]
    return cols


def markdown(title: str, rows: list[dict], cols: list[tuple[str, Callable[[dict], str]]]) -> str:
    lines = [title, "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]) + "\n"


def title(meta: dict, what: str) -> str:
    return (f"{what}, capacity {meta['capacity']}, query tile {meta['q_tile']} (flat), widths {meta['widths']}, "
            f"prefixes {meta['prefixes']}, {meta['device']} ({meta['dtype']}), torch {meta['torch']}, {meta['date']}")


def flat_tiles(head_dim: int, q_tile: int) -> dict | None:
    """The flat layout's FlexAttention tiles: the engine's for the head dim (models/fused.py: flex_tiles), with the
    query tile no larger than a segment's (--q-tile below 128)."""
    from lopa.models.fused import flex_tiles

    opts = {**(flex_tiles(head_dim) or {}), **({"BLOCK_M": q_tile} if q_tile < TILE else {})}
    return opts or None


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The step's workload and the CPU check (--tiny), as flat_attention.py and flat_forward.py take them."""
    ap.add_argument("--tiny", action="store_true", help="the tiny heads, 3 requests, capacity 1024 (a CPU check)")
    ap.add_argument("--ns", default="8,32")
    ap.add_argument("--ks", default="3,7")
    ap.add_argument("--widths", default="32,64,32,64,96", help="each request's window W, cycled")
    ap.add_argument("--prefixes", default="128,640", help="prefix lengths spread over [lo, hi)")
    ap.add_argument("--capacity", type=int, default=2048, help="KV positions a slot (a multiple of 128)")
    ap.add_argument("--q-tile", type=int, default=128, choices=(32, 64, 128),
                    help="the flat layout's query tile (segments padded to it; the kernel's BLOCK_M at most it)")


def parse_workload(ap: argparse.ArgumentParser, args) -> tuple:
    """-> device, cuda, dtype (bfloat16 on a GPU, float32 on a CPU), widths, (lo, hi) prefixes, ks; --tiny sets the
    CPU check's sizes (3 requests, k 1 and 3, capacity 1024)."""
    if args.tiny:
        args.ns, args.ks, args.capacity, args.prefixes = "3", "1,3", 1024, "5,300"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    widths = [int(w) for w in args.widths.split(",")]
    prefixes = tuple(int(p) for p in args.prefixes.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    if args.capacity % TILE or prefixes[1] + (max(ks) + 1) * max(widths) >= args.capacity:
        ap.error(f"--capacity must be a multiple of {TILE} and hold the longest prefix and window (and a trash "
                 f"position)")
    return device, cuda, torch.bfloat16 if cuda else torch.float32, widths, prefixes, ks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flat_attention"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dream-7b")
    add_workload_args(ap)
    ap.add_argument("--tol", type=float, default=None, help="largest relative error (default: 1e-5 in float32, "
                    "2e-2 in bfloat16)")
    args = ap.parse_args()
    if args.tiny:
        args.shape = "tiny"
    device, cuda, dtype, widths, prefixes, ks = parse_workload(ap, args)
    from torch.nn.attention.flex_attention import flex_attention

    if cuda:  # as the engine compiles it: static lengths, the engine's tiles (models/fused.py)
        from lopa.models.fused import compiled

        flex_padded = compiled().flex
        flex_flat = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        opts = flat_tiles(SHAPES[args.shape][2], args.q_tile)
        flex_flat_call = lambda *a, **kw: flex_flat(*a, kernel_options=opts, **kw)  # noqa: E731
        from gemm_rows import median_ms as timer
    else:  # eager: FlexAttention's reference implementation
        flex_padded = flex_flat_call = flex_attention
        timer = None
    tol = args.tol if args.tol is not None else (2e-2 if dtype == torch.bfloat16 else 1e-5)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        for k in ks:
            row = run_case(n, k, widths, prefixes, args.capacity, args.shape, args.q_tile, device, dtype,
                           flex_padded, flex_flat_call, timer)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "torch": torch.__version__,
            "shape": args.shape, "capacity": args.capacity, "widths": args.widths, "prefixes": args.prefixes,
            "q_tile": args.q_tile,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flat_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = columns("padded_ms" in rows[0])
    cols.insert(4, ("key tiles listed padded / flat", lambda r: f"{r['tiles_padded']:,} / {r['tiles_flat']:,}"))
    if "padded_ms" in rows[0]:
        cols.append(("flat, slot-major pool ms", lambda r: f"{r['slots_ms']:.3f}"))
        cols.append(("masks ms padded / flat", lambda r: f"{r['mask_padded_ms']:.3f} / {r['mask_flat_ms']:.3f}"))
    table = markdown(title(meta, f"{meta['shape']} heads"), rows, cols)
    (args.out / "flat_attention.md").write_text(table)
    print(table)
    bad = [r for r in rows if not r["err"] <= tol]
    if bad:
        sys.exit(f"flat attention differs from the padded one past {tol}: {[(r['n'], r['k'], r['err']) for r in bad]}")


if __name__ == "__main__":
    main()
