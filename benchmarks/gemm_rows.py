"""The GEMMs of one Dream-7B forward at the row counts a LoPA iteration gives (M = K*W), by GEMM path.

Answers, for the engine: does padding the window's rows to a rounder count buy GEMM speed, and how much do
other GEMM paths buy at these row counts? Paths, side by side in the same run: bf16 through cuBLAS
(F.linear, what the engine runs); bf16 through Inductor's autotuned Triton templates (torch.compile
max-autotune); fp8 (e4m3) with one scale per row of the activation and per output channel of the weight
(torch._scaled_mm, Hopper), timed alone and with the activation's quantization (the engine's fused
quantizer, models/quant.py) included. Each is timed as a CUDA-graph replay, as the engine runs it.

    PYTHONPATH=src python3 benchmarks/gemm_rows.py --out benchmarks/results   # writes gemm_rows.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lopa.models.fused import fused_ops
from lopa.models.quant import quantize_rows

E, I, HQKV, LAYERS = 3584, 18944, (28 + 8) * 128, 28  # Dream-7B: hidden, intermediate, q+k+v width, layers
SHAPES = {"qkv": (E, HQKV), "o": (E, E), "gate_up": (E, 2 * I), "down": (I, E)}
def median_ms(fn, reps=20) -> float:
    """Median GPU time of fn, captured in a CUDA graph and replayed (as the engine runs it: no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--rows", default="352,384,512,704,768,1024")
    ap.add_argument("--autotune-rows", default="352,704", help="rows for the (slow to compile) max-autotune path")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    weights = {n: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for n, (i, o) in SHAPES.items()}
    wq = {n: quantize_rows(w) for n, w in weights.items()}  # per output channel
    quant = fused_ops(dev, dt).quantize_rows  # the engine's fused quantizer
    autotuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", fullgraph=True)
    autotune_rows = {int(m) for m in args.autotune_rows.split(",") if m}
    paths = ["bf16 cuBLAS", "bf16 autotuned", "fp8 GEMM", "fp8 GEMM + quant"]
    lines = ["| M | " + " | ".join(f"{p} ms" for p in paths) + " | " + " | ".join(f"{p} TFLOP/s" for p in paths) + " |",
             "|---" * (1 + 2 * len(paths)) + "|"]
    rows = []
    flops_per_row = 2 * LAYERS * sum(i * o for i, o in SHAPES.values())
    for M in (int(m) for m in args.rows.split(",")):
        row = {"M": M}
        for n, (i, o) in SHAPES.items():
            x = torch.randn(M, i, device=dev, dtype=dt)
            w = weights[n]
            w8, sw = wq[n]
            x8, sx = quantize_rows(x)
            sw = sw.t().contiguous()  # [1, N]

            def fp8(x8=x8, sx=sx, w8=w8, sw=sw):
                return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=dt)

            def fp8_quant(x=x, w8=w8, sw=sw):
                x8, sx = quant(x)
                return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=dt)

            ref = F.linear(x, w).float()
            row[n] = {"bf16 cuBLAS": median_ms(lambda: F.linear(x, w)), "fp8 GEMM": median_ms(fp8),
                      "fp8 GEMM + quant": median_ms(fp8_quant),
                      "fp8 rel err": float((fp8_quant().float() - ref).norm() / ref.norm())}
            if M in autotune_rows:
                row[n]["bf16 autotuned"] = median_ms(lambda: autotuned(x, w))
        for p in paths:
            if all(p in row[n] for n in SHAPES):
                row[f"{p} ms"] = LAYERS * sum(row[n][p] for n in SHAPES)
                row[f"{p} TFLOP/s"] = flops_per_row * M / row[f"{p} ms"] / 1e9
        rows.append(row)
        cell = lambda key, fmt: fmt.format(row[key]) if key in row else ""  # noqa: E731
        lines.append(f"| {M} | " + " | ".join(cell(f"{p} ms", "{:.2f}") for p in paths) + " | "
                     + " | ".join(cell(f"{p} TFLOP/s", "{:.0f}") for p in paths) + " |")
        print(lines[-1], json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "what": "the four GEMMs of one layer times 28 layers, median of 20 CUDA-graph replays each; fp8 rel err = relative "
                    "Frobenius error of the fp8 product against bf16 on random data"}
    (args.out / "gemm_rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "gemm_rows.md").write_text(f"{meta['device']}, torch {meta['torch']}; {meta['what']}\n\n"
                                           + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
