"""The attention's K/V write into the cache slots, one layer, in variants side by side.

Why: in the 32-request lopa step of the embedded model (H100, docs/benchmarks.md, twelfth session) the two
`index_copy_` kernels of the cache write took 8.9 us a call for about 2 MB each, about 0.24 TB/s, 6.6% of the
step's kernel time; v, a strided view of the fused q/k/v projection, was also copied contiguous before its write
(one of the three elementwise copies a layer in that profile). Variants, each writing the same rows:

    index_copy  the engine before the thirteenth session: k RoPE'd by its own compiled chain, then k and v
                index_copy_'d (v copied contiguous first)
    index_put   k RoPE'd by its own compiled chain, the rows written by index_put_ straight from the strided views
    compiled    the same, both writes in one torch.compile'd function (models/fused.py: compile_whole), dynamic in
                the rows from its first call as the engine's chains are
    engine      the engine now: k's RoPE fused into that compiled write (models/fused.py: rope_write, as
                fused.compiled() makes it)

Each at --steps (B x Qb: default 1x32 and 32x256) for --shapes (default: the embedded model and Dream-7B's heads),
slots of --capacity positions, the queries written at P = --prefix onwards. Times: CUDA-graph replay medians on a
GPU (gemm_rows.median_ms), wall medians on a CPU (step_latency.timed); "GB/s" = the bytes the write must move (k and
v read, written once; cos and sin read where RoPE is fused) over the time. After each variant the pool holds
what index_copy leaves, asserted (exactly; within bf16 rounding where RoPE is fused).

    PYTHONPATH=src:benchmarks python3 benchmarks/kv_write.py --out benchmarks/results/kv_write_h100
    PYTHONPATH=src:benchmarks python3 benchmarks/kv_write.py --device cpu --backend eager --shapes default  # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from lopa.cache import CacheView, KVPool
from lopa.models import fused
from lopa.models.transformer import rope as rope_tables
from step_latency import kernel_ms  # a sibling benchmark

# query heads, KV heads, head dim
SHAPES = {"default": (4, 2, 64), "dream-7b": (28, 4, 128), "tiny": (2, 1, 8)}
VARIANTS = ("index_copy", "index_put", "compiled", "engine")


def _index_copy(view: CacheView, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """The cache write before rope_write (k RoPE'd): each tensor's [B, Qb, Hkv, D] rows made contiguous (a view
    for k, a copy for v) and index_copy_'d at the flat index."""
    D = k.shape[-1]
    for rows, x in zip(view.rows(layer), (k, v)):
        rows.index_copy_(0, view.index.reshape(-1), x.transpose(1, 2).reshape(-1, D))


def _write(k_rows, v_rows, index, k, v) -> None:
    """rope_write without the RoPE: k (RoPE'd) and v [B, Hkv, T, D] put at index [B, T, Hkv] of the rows [N, D]."""
    k_rows.index_put_((index,), k.transpose(1, 2))
    v_rows.index_put_((index,), v.transpose(1, 2))


def variants(backend: str) -> dict:
    """name -> write(view, layer, k [B, Hkv, T, D] before RoPE, v [B, Hkv, T, D], cos, sin): each writes layer's rows
    of the view's slots. The compiled writes are dynamic in the rows (not the KV heads) from their first call,
    through the engine's own wrapper and marks."""
    ops = fused.compiled(backend)
    # rope_write's marks without cos and sin
    write = fused._dynamic_rows(fused.compile_whole(_write, backend), fused._cache_rows, ops.tracing)

    def index_copy(view, layer, k, v, cos, sin):
        _index_copy(view, layer, ops.rope(k, cos, sin), v)

    def index_put(view, layer, k, v, cos, sin):
        _write(*view.rows(layer), view.index, ops.rope(k, cos, sin), v)

    def compiled(view, layer, k, v, cos, sin):
        write(*view.rows(layer), view.index, ops.rope(k, cos, sin), v)

    def engine(view, layer, k, v, cos, sin):
        ops.rope_write(*view.rows(layer), view.index, k, v, cos, sin)

    return {"index_copy": index_copy, "index_put": index_put, "compiled": compiled, "engine": engine}


def case(shape: str, B: int, T: int, prefix: int, capacity: int, device, dtype):
    """A pool of B slots (2 layers), a view writing T queries a row at [prefix, prefix + T), and the layer's k (before
    RoPE) and v as the attention makes them: views of the fused projection [B, T, (H + 2 Hkv) D], transposed."""
    H, HKV, D = SHAPES[shape]
    pool = KVPool(2, HKV, D, 8, B, capacity, device, dtype)
    write_index = (prefix + torch.arange(T, device=device)).expand(B, T)
    view = CacheView(pool, 0, B, min(capacity, prefix + T), write_index)
    qkv = torch.randn(B, T, (H + 2 * HKV) * D, device=device, dtype=dtype)
    _, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    k, v = (x.view(B, T, HKV, D).transpose(1, 2) for x in (k, v))  # [B, Hkv, T, D]
    cos, sin = rope_tables(torch.arange(T, device=device)[None].expand(B, T) + prefix, D, 1e4)  # [B, 1, T, D]
    size = torch.finfo(dtype).bits // 8
    bytes_ = 2 * 2 * B * T * HKV * D * size  # k and v, read and written once
    return pool, view, k, v, cos, sin, bytes_, bytes_ + 2 * cos.numel() * cos.element_size()


def write_tables(out: Path, meta: dict, rows: list[dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_write.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, backend {meta['backend']}, {meta['date']}: one layer's K/V "
             f"write, slots of {meta['capacity']} positions from P = {meta['prefix']}; (x) = {rows[0]['variant']} ms / "
             "this ms, above 1 faster; GB/s = bytes the write must move / its time", "",
             "| shape | B x Qb | variant | ms (x) | GB/s | equal |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["shape"] == r["shape"] and b["step"] == r["step"])
        lines.append(f"| {r['shape']} | {r['step']} | {r['variant']} | {r['ms']:.4f} ({base['ms'] / r['ms']:.2f}) | "
                     f"{r['MB'] / r['ms']:.0f} | {r['equal']} |")
    table = "\n".join(lines) + "\n"
    (out / "kv_write.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_write"))
    ap.add_argument("--shapes", default="default,dream-7b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--steps", default="1x32,32x256", help="comma-separated B x Qb")
    ap.add_argument("--prefix", type=int, default=512, help="committed positions before the written queries")
    ap.add_argument("--capacity", type=int, default=2048, help="positions a slot")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="inductor", help="'eager' only traces (the CPU smoke test)")
    args = ap.parse_args()
    steps = [tuple(int(x) for x in s.split("x")) for s in args.steps.split(",")]
    if max(T for _, T in steps) + args.prefix > args.capacity:
        ap.error(f"--capacity {args.capacity} is below --prefix + the largest Qb ({args.prefix} + "
                 f"{max(T for _, T in steps)})")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = kernel_ms(device)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "backend": args.backend, "prefix": args.prefix, "capacity": args.capacity,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    fns = variants(args.backend)
    rows = []
    for shape in args.shapes.split(","):
        for B, T in steps:
            pool, view, k, v, cos, sin, plain, with_tables = case(shape, B, T, args.prefix, args.capacity, device,
                                                                   dtype)
            with torch.inference_mode():  # what the old write leaves in a zeroed pool
                fns["index_copy"](view, 1, k, v, cos, sin)
                want = pool.kv.clone()
            for name in names:
                pool.kv.zero_()
                with torch.inference_mode():
                    fns[name](view, 1, k, v, cos, sin)
                    got = pool.kv.clone()
                    exact = name != "engine"
                    equal = torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-2, atol=1e-2)
                    ms = timer(lambda: fns[name](view, 1, k, v, cos, sin))
                rows.append({"shape": shape, "step": f"{B}x{T}", "variant": name, "ms": ms, "equal": bool(equal),
                             "MB": (with_tables if name == "engine" else plain) / 1e6})
                print(json.dumps(rows[-1]), flush=True)
                table = write_tables(args.out, meta, rows)  # after every row: a cut run keeps its rows
    print(table)
    if not all(r["equal"] for r in rows):
        raise SystemExit("a variant wrote other values than index_copy: " +
                         ", ".join(f"{r['shape']} {r['step']} {r['variant']}" for r in rows if not r["equal"]))


if __name__ == "__main__":
    main()
