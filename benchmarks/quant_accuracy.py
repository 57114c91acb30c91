"""Accuracy cost of the quantized decoder Linears (models/quant.py) on the same problems, paired.

Loads the model once per precision (full, then each --schemes entry), runs the same strategies on the same
GSM8K-style problems with each, and reports every quantized run against the full-precision run of the same
strategy: accuracy difference problem by problem with a 95% interval, and the TPF ratio.

    PYTHONPATH=src python3 benchmarks/quant_accuracy.py --n 500 --device cpu --out docs/results/quant_500
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import lopa
from lopa.config import decode_config
from lopa.eval.harness import paired_difference, run_eval
from lopa.eval.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--schemes", default="int8,fp8")
    ap.add_argument("--k", type=int, default=7, help="lookahead branches of the lopa run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/quant_accuracy"))
    args = ap.parse_args()
    problems = TASKS["gsm8k"](None, args.n)
    reports = {}
    for scheme in [None, *args.schemes.split(",")]:
        model = lopa.load_model(runner=lopa.RunnerConfig(device=args.device, quantize=scheme))
        configs = {name + (f" k={args.k}" if name == "lopa" else ""): decode_config(None, model.model_type, strategy=name, k=args.k if name == "lopa" else 0)
                   for name in ("d2f", "lopa")}
        reports[scheme or "full"] = run_eval(model, problems, configs)
        print(scheme or "full", [(r.label, r.accuracy, r.tpf) for r in reports[scheme or "full"]], flush=True)
    full = reports["full"]
    rows = []
    for scheme, runs in reports.items():
        for ref, run in zip(full, runs):
            row = {"precision": scheme, "strategy": run.label, "accuracy": run.accuracy, "tpf": run.tpf,
                   "decode_s": sum(r.decode_s for r in run.records)}
            if scheme != "full":
                row["vs_full"] = paired_difference(ref, run)
            rows.append(row)
    meta = {"model": "embedded default", "device": args.device, "n": args.n, "k": args.k,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "benchmarks/quant_accuracy.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items())}
    lines = [f"{meta['command']} ({meta['date']})", "",
             "| precision | strategy | accuracy | TPF | vs full precision (95% score interval; problems flipped) |",
             "|---|---|---|---|---|"]
    for r in rows:
        p = r.get("vs_full")
        vs = (f"{100 * p['difference']:+.1f} points ({100 * p['ci95'][0]:+.1f} to {100 * p['ci95'][1]:+.1f}; "
              f"{p['b_only_correct']} gained, {p['a_only_correct']} lost)" if p else "")
        lines.append(f"| {r['precision']} | {r['strategy']} | {100 * r['accuracy']:.1f}% | {r['tpf']:.2f} | {vs} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "quant_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
