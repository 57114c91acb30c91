"""Branch scores and branch budgets against fixed-k mean-confidence LoPA, and the paper's missing checks.

One process, one model load, everything paired on the same problems (issue 16):
  1. LoPA at k (default 14) with each branch score (mean = Eq. 2, count, top_m, segment, logsum) and the
     fixed / text budgets, plus fixed-k mean at smaller k for the cost frontier; each paired with k-fixed-mean.
  2. The checks (lopa.eval.checks): lookahead (k=0 vs k) and predictor on all problems, tfo on the first
     --tfo-n problems with --orders random orders each.
Writes <out>/main/{eval.json,eval.md,eval.png}, <out>/checks/{checks.json,checks.md,checks_*.png} and
<out>/summary.md (both Markdown reports with the timings).

    PYTHONPATH=src python3 benchmarks/branch_research.py --n 1000 --device cuda --out runs/branch_research
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lopa
from lopa.config import decode_config
from lopa.eval.checks import markdown as checks_markdown
from lopa.eval.checks import run_checks, write_checks
from lopa.eval.harness import markdown, paired_difference, run_eval, write_reports
from lopa.eval.tasks import gsm8k

SCORES = ("mean", "count", "top_m", "segment", "logsum")  # mean first: the reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--k", type=int, default=14)
    ap.add_argument("--frontier", default="4,7", help="smaller fixed k (mean score) for the cost frontier")
    ap.add_argument("--variants", default=",".join([f"{s}:fixed" for s in SCORES] + ["mean:text", "count:text"]),
                    help="score:budget pairs at k; the first must be mean:fixed (the reference)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--checks", default="lookahead,predictor,tfo")
    ap.add_argument("--orders", type=int, default=100)
    ap.add_argument("--tfo-n", type=int, default=50)
    ap.add_argument("--predictor-n", type=int, default=None, help="problems for the predictor check (default: n)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fuse", action="store_true", help="fused kernels (torch.compile; compile time lands in the run)")
    ap.add_argument("--out", type=Path, default=Path("runs/branch_research"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = lopa.load_model(runner=lopa.RunnerConfig(device=args.device, fuse=args.fuse))
    problems = gsm8k(None, args.n)
    base = dict(strategy="lopa", gen_length=args.gen_length)
    ref = f"lopa k={args.k}"
    configs = {}
    for variant in args.variants.split(","):
        score, budget = variant.split(":")
        label = ref + (f" score={score}" if score != "mean" else "") + (f" budget={budget}" if budget != "fixed" else "")
        configs[label] = decode_config(None, model.model_type, k=args.k, branch_confidence=score, k_policy=budget, **base)
    for k in [int(x) for x in args.frontier.split(",") if x]:
        configs[f"lopa k={k}"] = decode_config(None, model.model_type, k=k, **base)
    timings = {"load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    reports = run_eval(model, problems, configs, progress=False)
    timings["main_s"] = time.perf_counter() - t
    by_label = {r.label: r for r in reports}
    pairs = [paired_difference(by_label[ref], r) for r in reports if r.label != ref]
    meta = {"model": str(model.path), "device": str(model.runner.device), "fused kernels": model.fused, "n": args.n,
            "task": "gsm8k", "data": "generated test split", "k": args.k, "gen_length": args.gen_length,
            "counting": "tokens up to and including the first EOS; one decode forward per iteration however many "
                        "branches; branch rows = rows summed over decode forwards; prefill apart"}
    write_reports(reports, pairs, args.out / "main", meta)
    main_md = markdown(reports, pairs)
    (args.out / "summary.md").write_text(main_md)

    checks = [c for c in args.checks.split(",") if c]
    checks_md = ""
    if checks:
        cfg = configs[ref]
        result = {}
        for name in checks:  # one at a time, so that a run cut short keeps the finished ones
            t = time.perf_counter()
            sub = problems[: args.predictor_n] if name == "predictor" and args.predictor_n else problems
            result.update(run_checks(model, sub, cfg, [name], args.orders, args.tfo_n))
            timings[f"check_{name}_s"] = time.perf_counter() - t
            result["meta"] = meta | {"timings": timings}
            write_checks(result, args.out / "checks")
            checks_md = checks_markdown(result)
            (args.out / "summary.md").write_text(main_md + "\n" + checks_md + "\n" + json.dumps(timings) + "\n")
    timings["total_s"] = time.perf_counter() - t0
    (args.out / "summary.md").write_text(main_md + "\n" + checks_md + "\n" + json.dumps(timings) + "\n")
    print(main_md + "\n" + checks_md + "\n" + json.dumps(timings), flush=True)


if __name__ == "__main__":
    main()
