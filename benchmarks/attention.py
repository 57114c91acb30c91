"""The static path's attention alone, one layer: SDPA with today's additive mask against FlexAttention over the
whole slot with the device-built block mask (models/attention.py: step_block_mask), in kernel variants, side by
side in one run.

Case: n requests, each K = k+1 branches x W columns (Qb = K*W queries, padded to the static path's bucket)
over its own P-position prefix; heads of --shape: dream-7b (28 query heads over 4 KV heads of 128) or default
(the embedded model: 4 over 2 of 64). "sdpa": the keys of the first Lb = round_up(P + Qb, 256) positions with an
additive [n, 1, Qb, Lb] mask. "flex*": the keys of the whole slot (capacity --capacity) with the block mask.
"engine" is exactly what the static path runs: models/fused.py's compiled FlexAttention (static query and key
lengths, dynamic batch) with the query heads of a KV head on the query axis and step_block_mask(groups=...).
Other variants: compiled with dynamic shapes, or per shape ("static"); "packed" = the engine's query axis; words
m64 / n32 / w4 / s3 = kernel options BLOCK_M / BLOCK_N / num_warps / num_stages ("engine m64 n64": the engine's
kernel with those tiles, "engine torch" with torch's default tiles; the engine picks them by head dim:
models/fused.py flex_tiles). "engine split" = the engine's kernel with the keys in chunks where the step leaves the
GPU idle (models/attention.py: key_splits, split_attention, as the runner does with models/fused.py's compiled
Ops.split; the chunk count in the table), "engine split:N" in N chunks always, "engine split unfused" with the
repeat and the merge eager around the compiled kernel (before Ops.split); the word "unaligned": compiled without
Inductor's assume_aligned_inputs (models/fused.py: compile_whole; the engine before the twelfth session). "tiles" =
key tiles the mask lists per query tile (partial + full), averaged over the real ones. Times: median of CUDA-graph
replays of the attention call (the mask is built once per step for all layers, timed apart as "mask").

    PYTHONPATH=src python3 benchmarks/attention.py --out benchmarks/results/attention_h100
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lopa.models.attention import key_splits, split_attention, step_block_mask, step_mask
from lopa.runner.graphs import query_bucket, round_up

from gemm_rows import median_ms  # CUDA-graph replays, median

SHAPES = {"dream-7b": (28, 4, 128), "default": (4, 2, 64)}  # query heads, KV heads, head dim


def case_tensors(n: int, k: int, W: int, P: int, cap: int, device, H: int, HKV: int, D: int):
    K = k + 1
    Qb = query_bucket(K * W)
    branch = torch.full((n, Qb), -1, device=device)
    branch[:, :K * W] = torch.arange(K, device=device).repeat_interleave(W)
    block = torch.zeros(n, Qb, dtype=torch.long, device=device)
    Pt = torch.full((n,), P, device=device)
    q = torch.randn(n, H, Qb, D, device=device, dtype=torch.bfloat16)
    # K at its buffer's start, V past it: as the engine's cache views at a compile's first call (layer 0, slot 0),
    # where a compile dynamic in the batch specializes K's offset to 0 and makes V's symbolic (models/fused.py:
    # compile_whole)
    kv = torch.randn(2, n, HKV, cap, D, device=device, dtype=torch.bfloat16)
    return Pt, branch, block, q, kv, Qb


def tiles_of(name: str) -> dict:
    """Kernel options from a variant's words: m64 -> BLOCK_M 64, n32 -> BLOCK_N 32, w4 -> num_warps 4, s3 ->
    num_stages 3 ("m64" alone: 64 x 64)."""
    keys = {"m": "BLOCK_M", "n": "BLOCK_N", "w": "num_warps", "s": "num_stages"}
    opts = {keys[w[0]]: int(w[1:]) for w in name.split() if w[:1] in keys and w[1:].isdigit()}
    if opts.keys() == {"BLOCK_M"}:
        opts["BLOCK_N"] = opts["BLOCK_M"]
    return opts


def tiles(mask, Qb: int, groups: int, size: int = 128) -> float:
    """Mean key tiles (partial + full) the block mask lists per query tile holding a real query."""
    n_real = -(-groups * Qb // size)
    per = (mask.kv_num_blocks + mask.full_kv_num_blocks)[:, :, :n_real].float()
    return float(per.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention"))
    ap.add_argument("--prefixes", default="512,2048,8192")
    ap.add_argument("--ks", default="0,7,14")
    ap.add_argument("--ns", default="1,16")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--capacity", type=int, default=16384)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dream-7b")
    ap.add_argument("--variants", default="engine,flex packed static,flex packed m64 static",
                    help="FlexAttention variants (module docstring): 'engine' = the static path's kernel, 'packed' = "
                    "query heads of a KV head on the query axis, 'static' = compiled for each shape (else dynamic "
                    "shapes), m64 / n64 / w4 / s3 = kernel options")
    args = ap.parse_args()
    widest = max(int(P) for P in args.prefixes.split(",")) + query_bucket((max(int(k) for k in args.ks.split(",")) + 1)
                                                                          * args.window)
    if round_up(widest, 256) > args.capacity:  # the SDPA reference's mask spans P + Qb rounded to 256 keys
        ap.error(f"--capacity {args.capacity} is below the widest case's keys ({round_up(widest, 256)}: the longest "
                 f"prefix and the largest k's queries, rounded to 256); raise it")
    from torch.nn.attention.flex_attention import flex_attention

    from lopa.models.fused import compiled
    H, HKV, D = SHAPES[args.shape]

    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for name in ("recompile_limit", "cache_size_limit"):  # "static" variants compile once per case
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    # name -> (packed query heads, or "split", kernel call); each its own compiled function (no shared cache)
    variants = {}
    unsplit = compiled().flex
    aligned = {name: "unaligned" not in name.split() for name in args.variants.split(",")}
    for name in args.variants.split(","):
        opts = tiles_of(name)
        if name.startswith("engine split"):  # the runner's choice of chunks, or "engine split:N"; "unfused": the
            # compiled kernel between the eager repeat and merge (what the engine ran before Ops.split)
            ops = compiled(aligned=aligned[name])
            variants[name] = ("split", functools.partial(split_attention, ops.flex) if "unfused" in name else ops.split)
            continue
        if name.startswith("engine"):  # with tile words: the engine's call with other kernel tiles
            fn = compiled(aligned=aligned[name]).flex
            if opts or "torch" in name:  # "engine torch": torch's default tiles, whatever the head dim
                fn = functools.partial(fn, kernel_options=opts)
            variants[name] = (True, fn)
            continue
        dynamic = "static" not in name
        fn = torch.compile(flex_attention, fullgraph=True, dynamic=dynamic)
        packed = "packed" in name
        variants[name] = (packed, functools.partial(fn, enable_gqa=not packed, kernel_options=opts or None))
    rows = []
    for P in [int(x) for x in args.prefixes.split(",")]:
        for k in [int(x) for x in args.ks.split(",")]:
            for n in [int(x) for x in args.ns.split(",")]:
                Pt, branch, block, q, kv, Qb = case_tensors(n, k, args.window, P, args.capacity, device, H, HKV, D)
                row = {"P": P, "k": k, "n": n, "Qb": Qb}
                with torch.inference_mode():
                    Lb = round_up(P + Qb, 256)
                    mask = torch.zeros(n, 1, Qb, Lb, dtype=torch.bfloat16, device=device)
                    mask.masked_fill_(~step_mask(Pt, branch, block, Lb)[:, None], float("-inf"))
                    ks, vs = kv[0][:, :, :Lb], kv[1][:, :, :Lb]
                    ref = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=True)
                    row["sdpa_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask,
                                                                                       enable_gqa=True))
                    row["mask_sdpa_ms"] = median_ms(lambda: step_mask(Pt, branch, block, Lb))
                    bm = step_block_mask(Pt, branch, block, args.capacity)
                    row["mask_flex_ms"] = median_ms(lambda: step_block_mask(Pt, branch, block, args.capacity))
                    real = (branch >= 0)[:, None, :, None]
                    pm = step_block_mask(Pt, branch, block, args.capacity, groups=H // HKV)  # the engine's
                    row["tiles"] = tiles(pm, Qb, H // HKV)
                    qp = q.view(n, HKV, H // HKV * Qb, D)  # heads of a KV group consecutive: [n, Hkv, 7*Qb, D]
                    for name, (packed, fn) in variants.items():
                        if packed == "split":
                            forced = int(name.partition(":")[2].split()[0]) if ":" in name else 0
                            S = forced or key_splits(n, Qb, H // HKV, HKV, D, args.capacity, sms)
                            row[f"{name}_splits"] = S
                            sm = step_block_mask(Pt, branch, block, args.capacity, groups=H // HKV, splits=S,
                                                 kv_heads=HKV)
                            call = functools.partial(fn, q, kv[0], kv[1], sm) if S > 1 else \
                                functools.partial(unsplit, qp, kv[0], kv[1], block_mask=pm)  # the rule splits nothing
                        else:
                            call = (lambda: fn(qp, kv[0], kv[1], block_mask=pm)) if packed else \
                                (lambda: fn(q, kv[0], kv[1], block_mask=bm))
                        try:
                            out = call().view(n, H, Qb, D)
                            row[f"{name}_err"] = float(((out - ref) * real).float().norm() / (ref * real).float().norm())
                            row[f"{name}_ms"] = median_ms(call)
                        except Exception as err:  # noqa: BLE001 - a kernel variant that does not build
                            row[f"{name}_ms"] = None
                            row[f"{name}_error"] = repr(err)[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    names = list(variants)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "W": args.window, "shape": args.shape,
            "capacity": args.capacity, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = ("| P | k | n | Qb | tiles | sdpa ms | " + " | ".join(f"{v} ms (sdpa/it)" for v in names)
            + " | mask sdpa / flex ms |")
    lines = [f"{args.shape} heads {H}/{HKV}x{D}, capacity {args.capacity}, W {args.window}, {meta['device']}, "
             f"torch {meta['torch']}, {meta['date']}", "", head, "|" + "---|" * (6 + len(names) + 1)]
    for r in rows:
        cells = []
        for v in names:
            t = r.get(f"{v}_ms")
            splits = f" [{r[f'{v}_splits']}]" if f"{v}_splits" in r else ""
            cells.append("failed" if t is None else f"{t:.3f} ({r['sdpa_ms'] / t:.2f}){splits}")
        lines.append(f"| {r['P']} | {r['k']} | {r['n']} | {r['Qb']} | {r['tiles']:.1f} | {r['sdpa_ms']:.3f} | "
                     + " | ".join(cells) +
                     f" | {r['mask_sdpa_ms']:.3f} / {r['mask_flex_ms']:.3f} |")
    (args.out / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
