"""The paper's open question on small block-diffusion models: each model's own decoding vs LoPA over it.

For each model folder (written by `lopa train --objective block_diffusion`, or a real SDAR / Fast-dLLM v2
folder): the model's own loop (SDAR's dynamic threshold, or Fast-dLLM v2's sub-blocks, at --tau) and LoPA
over that loop at each --ks and each --variants (how branches are scored: DecodeConfig.score_span and
verify_lookahead, VARIANTS below), in the block size the model was trained with, on the same --n problems of
lopa's generated GSM8K-format test split, --batch-size problems per engine step. Per run: accuracy, TPF,
tokens/s, branch rows; per LoPA run the paired accuracy difference against the own loop with a 95% interval,
and per variant against the paper's scoring at the same k (eval.md also pairs next+verify with verify).
Before the timed runs every configuration decodes the first --warm problems once (not reported), so the CUDA
graphs the runs meet are mostly captured already and no run pays for them alone (tokens/s are warm figures).
Writes <out>/<model name>/eval.{json,md,png} (lopa eval's format) and <out>/bd_lopa.{json,md}.

    PYTHONPATH=src python3 benchmarks/bd_lopa.py --models runs/bd4,runs/bd32 --n 1000 --batch-size 64 --out $OUT/bd
    PYTHONPATH=src python3 benchmarks/bd_lopa.py --models /tmp/m --n 2 --ks 2 --gen-length 8 --out /tmp/x  # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import lopa
from lopa.config import decode_config
from lopa.eval.harness import paired_difference, run_eval, write_reports
from lopa.eval.tasks import gsm8k

from step_latency import git_commit


# LoPA's branch scoring over a block-diffusion loop: label suffix -> the DecodeConfig fields (both always set,
# so a run does not depend on their defaults). "paper": Eq. 2 over the active region, every branch competes.
VARIANTS = {
    "paper": dict(score_span="active", verify_lookahead=False),
    "next": dict(score_span="next_region", verify_lookahead=False),
    "verify": dict(score_span="active", verify_lookahead=True),
    "next+verify": dict(score_span="next_region", verify_lookahead=True),
}


def configs(model, tau: float, ks: list[int], variants: list[str], gen_length: int) -> dict:
    """The own loop first, then LoPA over it at each k and variant; every run in the model's trained block size."""
    loop = model.model_type  # "sdar" | "fast_dllm_v2": the strategy of the same name is the model's own loop
    common = dict(tau=tau, gen_length=gen_length, block_size=model.loaded.spec.block_size)
    runs = {f"{loop} tau={tau}": decode_config(None, model.model_type, strategy=loop, **common)}
    region = common["block_size"] if loop == "sdar" else runs[f"{loop} tau={tau}"].sub_block
    for k in ks:
        if k >= region:  # a branch fills one more mask of the active region, which holds at most region - 1 others
            print(f"{model.path.name}: k={k} skipped (the active region holds {region} positions)")
            continue
        for v in variants:
            runs[f"lopa k={k} {v}"] = decode_config(None, model.model_type, strategy="lopa", base=loop, k=k,
                                                    **VARIANTS[v], **common)
    return runs


def variant_pairs(reports: list) -> list[tuple]:
    """(a, b) report pairs beyond the own loop: each variant against the paper's scoring at its k, and
    next+verify against verify (what score_span adds under the check)."""
    by_label = {r.label: r for r in reports}
    out = []
    for r in reports[1:]:
        k_label, _, variant = r.label.rpartition(" ")
        for base, of in (("paper", variant != "paper"), ("verify", variant == "next+verify")):
            if of and f"{k_label} {base}" in by_label:
                out.append((by_label[f"{k_label} {base}"], r))
    return out


def interval(p: dict | None) -> str:
    return f"{100 * p['difference']:+.1f} ({100 * p['ci95'][0]:+.1f} to {100 * p['ci95'][1]:+.1f})" if p else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="comma-separated model folders")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--ks", default="3,7")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"LoPA runs per k, of {', '.join(VARIANTS)}")
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warm", type=int, default=64, help="problems each configuration decodes untimed first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bd_lopa"))
    args = ap.parse_args()
    problems = gsm8k(None, args.n)
    ks = [int(k) for k in args.ks.split(",")]
    variants = args.variants.split(",")
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: of {', '.join(VARIANTS)}, got {args.variants!r}")
    summary = []
    for folder in args.models.split(","):
        model = lopa.load_model(folder, runner=lopa.RunnerConfig(device=args.device, dtype=args.dtype,
                                                                 max_num_seqs=args.batch_size))
        if not model.config.block_diffusion:
            raise SystemExit(f"{folder}: a {model.model_type} model, not a block-diffusion one")
        runs = configs(model, args.tau, ks, variants, args.gen_length)
        if args.warm:
            run_eval(model, problems[:args.warm], runs, progress=False)
        reports = run_eval(model, problems, runs, progress=False)
        pairs = [paired_difference(reports[0], r) for r in reports[1:]]
        against = variant_pairs(reports)
        pairs += [paired_difference(a, b) for a, b in against]
        meta = dict(model=folder, block_size=model.loaded.spec.block_size, device=str(model.runner.device),
                    dtype=str(model.runner.dtype), n=len(problems), batch_size=args.batch_size, warm=args.warm,
                    commit=git_commit(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_reports(reports, pairs, args.out / Path(folder).name, meta)
        for r in reports:
            own = next((p for p in pairs if p["b"] == r.label and p["a"] == reports[0].label), None)
            paper = next((p for p in pairs if p["b"] == r.label and p["a"].endswith(" paper")), None)
            summary.append({"model": Path(folder).name, "block_size": meta["block_size"], **r.summary(),
                            "paired_vs_own": own, "paired_vs_paper": paper})
        model.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bd_lopa.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": summary}, indent=1, default=str))
    lines = ["| model | block | run | n | accuracy | TPF | tokens/s | rows/forward | accuracy vs own loop (95% CI) "
             "| vs lopa paper, same k (95% CI) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['block_size']} | {s['label']} | {s['n']} | {100 * s['accuracy']:.1f}% | "
                     f"{s['tpf']:.2f} | {s['tokens_per_s']:.0f} | "
                     f"{s['branch_rows'] / max(1, s['decode_forwards']):.2f} | {interval(s['paired_vs_own'])} | "
                     f"{interval(s['paired_vs_paper'])} |")
    (args.out / "bd_lopa.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
