"""The decoder layer's compiled elementwise chains (models/fused.py: RMSNorm with its residual add, RoPE, SiLU*up) at
a small and a large step, by the shape they were first called at.

Why: the chains are compiled dynamic in their rows, and Inductor fixes a generated kernel's launch configurations
from the sizes of its first call (the size hints its candidate configs are built from; the autotuning among them
at the first launch). The start-up warm-up called them first at its first key, B = 1 and Qb = 32, so later steps
ran kernels tuned for 32 rows: the eighth session's kernel table of 32 requests on the embedded model
(benchmarks/results/host_step_profile_compiled_h100) had RoPE and SiLU*up far below the bandwidth their bytes allow.
This measured the first shape as the cause (docs/benchmarks.md, twelfth session: the warm-up now runs its largest
key first, runner/graphs.py largest_first), and times what a static head count would add to RoPE.

Variants, each compiled afresh in the same process (dynamo reset, Inductor's local caches off):

    small first   the engine's compiled chains (fused.compiled()), called first at --small (the warm-up's order
                  before the twelfth session)
    large first   the same, called first at --large (the warm-up's order since)
    static        each chain compiled for each shape (torch.compile dynamic=False)
    heads static  RoPE with the head count static too (q and k each their own kernel), first at --small
    large first heads static   the same, first at --large

Each row: ms at each shape (CUDA-graph replay median on a GPU, wall median on a CPU), the bytes each chain must move
(reads + writes), and the ratio to "small first" at the same shape. --device cpu --backend eager is the smoke test.

    PYTHONPATH=src python3 benchmarks/chain_tuning.py --out benchmarks/results/chain_tuning_h100
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
from pathlib import Path

import torch

from lopa.models import fused
from lopa.models.transformer import rope as rope_tables
from step_latency import kernel_ms  # a sibling benchmark

# query heads, KV heads, head dim, hidden, intermediate
SHAPES = {"default": (4, 2, 64, 256, 768), "dream-7b": (28, 4, 128, 3584, 18944), "tiny": (2, 1, 8, 16, 32)}
VARIANTS = ("small first", "large first", "static", "heads static", "large first heads static")


def chains(variant: str, backend: str):
    """(rope, silu_mul, add_rms_norm) compiled afresh for one variant."""
    torch._dynamo.reset()
    if variant == "static":
        return tuple(torch.compile(f, backend=backend, fullgraph=True, dynamic=False)
                     for f in (fused.rope, fused.silu_mul, fused.add_rms_norm))
    ops = fused.compiled(backend)
    rope = ops.rope
    if variant.endswith("heads static"):
        compiled = torch.compile(fused.rope, backend=backend, fullgraph=True)

        def rope(x, cos, sin):  # the engine's marks (models/fused.py: _VARYING), the head dim static as well
            for d in (0, 2):
                torch._dynamo.maybe_mark_dynamic(x, d)
            for d in (1, 3):
                torch._dynamo.mark_static(x, d)
            for t in (cos, sin):
                for d in (0, 2):
                    torch._dynamo.maybe_mark_dynamic(t, d)
            with fused.size_oblivious():
                return compiled(x, cos, sin)
    return rope, ops.silu_mul, ops.add_rms_norm


def inputs(shape: str, B: int, T: int, device, dtype):
    H, HKV, D, E, I = SHAPES[shape]
    qkv = torch.randn(B, T, (H + 2 * HKV) * D, device=device, dtype=dtype)
    q, k, _ = qkv.split([H * D, HKV * D, HKV * D], dim=-1)  # the attention's views ([B, H, T, D], transposed)
    q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, HKV, D).transpose(1, 2)
    cos, sin = rope_tables(torch.arange(T, device=device)[None].expand(B, T) + 100, D, 1e4)
    gate_up = torch.randn(B, T, 2 * I, device=device, dtype=dtype)
    x, delta = (torch.randn(B, T, E, device=device, dtype=dtype) for _ in range(2))
    weight = torch.ones(E, device=device, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    bytes_ = {"rope": (q.numel() + k.numel()) * 2 * size + 2 * cos.numel() * 4 * 2,  # q, k in and out; cos, sin twice
              "silu": gate_up.numel() * size * 3 // 2,
              "rms": x.numel() * size * 4}  # x, delta in; x + delta, the norm out
    return q, k, cos, sin, gate_up, x, delta, weight, bytes_


def write(out: Path, meta: dict, rows: list[dict], tags: tuple[str, str]) -> str:
    """chain_tuning.json and chain_tuning.md under ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chain_tuning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date']}: ms at each shape ((x) = 'small first' ms / "
             "this ms at that shape, above 1 faster; GB/s = the bytes the chain must move / its time)", "",
             "| shape | variant | chain | " + " | ".join(f"{s} ms (x) | {s} GB/s" for s in tags) + " |",
             "|" + "---|" * 7]
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["variant"] == "small first"), row)
        for chain in ("rope", "silu", "rms"):
            cells = []
            for tag in tags:
                ms = row[f"{chain}_{tag}_ms"]
                cells.append(f"{ms:.4f} ({base[f'{chain}_{tag}_ms'] / ms:.2f}) | {row[f'{chain}_{tag}_MB'] / ms:.0f}")
            lines.append(f"| {row['shape']} | {row['variant']} | {chain} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "chain_tuning.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/chain_tuning"))
    ap.add_argument("--shapes", default="default,dream-7b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--small", default="1x32", help="B x T of the first warm-up key")
    ap.add_argument("--large", default="32x256", help="B x T of a large step")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="inductor", help="'eager' only traces (the CPU smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = kernel_ms(device)
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False  # every variant compiles and tunes afresh
    inductor_config.autotune_local_cache = False
    small, large = (tuple(int(x) for x in s.split("x")) for s in (args.small, args.large))
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "backend": args.backend, "small": args.small, "large": args.large,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            rope, silu, rms = chains(variant, args.backend)
            row = {"shape": shape, "variant": variant}
            for B, T in ([large, small] if variant.startswith("large first") else [small, large]):
                q, k, cos, sin, gate_up, x, delta, weight, bytes_ = inputs(shape, B, T, device, dtype)
                tag = f"{B}x{T}"
                with torch.inference_mode():
                    row[f"rope_{tag}_ms"] = timer(lambda: (rope(q, cos, sin), rope(k, cos, sin)))
                    row[f"silu_{tag}_ms"] = timer(functools.partial(silu, gate_up))
                    row[f"rms_{tag}_ms"] = timer(lambda: rms(x, delta, weight, 1e-6))
                for chain, n in bytes_.items():
                    row[f"{chain}_{tag}_MB"] = n / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
            table = write(args.out, meta, rows, (args.small, args.large))  # after every row: a cut run keeps its rows
    print(table)


if __name__ == "__main__":
    main()
