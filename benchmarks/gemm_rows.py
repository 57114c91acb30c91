"""The GEMMs of one Dream-7B forward at the row counts a LoPA iteration gives (M = K*W), and at rounder M.

Answers one question for the engine: does padding the window's rows to a rounder count buy GEMM speed?

    PYTHONPATH=src python3 benchmarks/gemm_rows.py --out benchmarks/results   # writes gemm_rows.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

E, I, HQKV, LAYERS = 3584, 18944, (28 + 8) * 128, 28  # Dream-7B: hidden, intermediate, q+k+v width, layers
SHAPES = {"qkv": (E, HQKV), "o": (E, E), "gate_up": (E, 2 * I), "down": (I, E)}


def median_ms(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    weights = {n: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for n, (i, o) in SHAPES.items()}
    lines = ["| M | " + " | ".join(f"{n} ms" for n in SHAPES) + " | 28 layers ms | TFLOP/s |",
             "|---" * (len(SHAPES) + 3) + "|"]
    rows = []
    for M in (352, 384, 448, 512, 704, 768, 896, 1024):
        row = {"M": M}
        for n, (i, o) in SHAPES.items():
            x = torch.randn(M, i, device=dev, dtype=dt)
            row[f"{n}_ms"] = median_ms(lambda: torch.nn.functional.linear(x, weights[n]))
        row["layers_ms"] = LAYERS * sum(row[f"{n}_ms"] for n in SHAPES)
        row["tflops"] = 2 * M * LAYERS * sum(i * o for i, o in SHAPES.values()) / row["layers_ms"] / 1e9
        rows.append(row)
        lines.append(f"| {M} | " + " | ".join(f"{row[f'{n}_ms']:.3f}" for n in SHAPES)
                     + f" | {row['layers_ms']:.2f} | {row['tflops']:.0f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "gemm_rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "gemm_rows.md").write_text(f"{meta['device']}, torch {meta['torch']}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
