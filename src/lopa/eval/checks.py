"""The checks the LoPA paper leaves out, run on the same problems as `lopa eval` (``--checks``).

    lookahead  what the lookahead itself buys: LoPA with k = 0 (the same loop and full-attention window, every
               forward a batch of one row) against LoPA with k branches; paired per problem.
    tfo        the token-filling order: per problem, the TPF of N random orders (a uniformly random winner among
               the same k+1 branches each iteration, seeds 0..N-1) against the order LoPA's branch confidence
               picks, and against the best and the worst random order of that problem.
    predictor  is Eq. 2 a good predictor? Per iteration and branch: its branch confidence against the positions
               it would have filled had it won (its lookahead plus the fill rule on its own predictions:
               Step.fills); and for the winner, its confidence against the positions filled one iteration later.

Counting is the harness's: tokens up to and including the first EOS, one decode forward per iteration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..api import LopaModel, generate_many
from ..config import DecodeConfig
from .harness import paired_difference, run_eval
from .tasks import Problem

CHECKS = ("lookahead", "tfo", "predictor")


def lookahead_check(model: LopaModel, problems: list[Problem], cfg: DecodeConfig, progress: bool = False) -> dict:
    k0, kk = run_eval(model, problems, {"lopa k=0": cfg.replace(k=0), f"lopa k={cfg.k}": cfg}, progress=progress)
    per_problem = [[a.tokens / max(1, a.forwards), b.tokens / max(1, b.forwards)] for a, b in zip(k0.records, kk.records)]
    return {"summary": [k0.summary(), kk.summary()], "paired": paired_difference(k0, kk), "per_problem_tpf": per_problem}


def _percentile(value: float, sample: list[float]) -> float:
    """Share of the sample below value, ties counted half (0 = below every random order, 1 = above all)."""
    below = sum(x < value for x in sample)
    ties = sum(x == value for x in sample)
    return (below + 0.5 * ties) / len(sample)


def tfo_check(model: LopaModel, problems: list[Problem], cfg: DecodeConfig, orders: int = 100,
              progress: bool = False) -> dict:
    configs = {"lopa": cfg} | {f"random seed={s}": cfg.replace(branch_confidence="random", seed=s) for s in range(orders)}
    reports = run_eval(model, problems, configs, progress=progress)
    lopa_report, randoms = reports[0], reports[1:]
    rows = []
    for i, problem in enumerate(problems):
        mine = lopa_report.records[i]
        tpfs = [r.records[i].tokens / max(1, r.records[i].forwards) for r in randoms]
        tpf = mine.tokens / max(1, mine.forwards)
        rows.append({"problem": problem.id, "lopa_tpf": tpf, "lopa_correct": mine.correct, "random_tpf": tpfs,
                     "random_correct": sum(r.records[i].correct for r in randoms) / orders,
                     "best": max(tpfs), "worst": min(tpfs), "median": float(np.median(tpfs)),
                     "percentile": _percentile(tpf, tpfs)})
    pct = [r["percentile"] for r in rows]
    return {
        "orders": orders, "n": len(problems), "problems": rows,
        "lopa": lopa_report.summary(),
        "random_mean_tpf": sum(r.tpf for r in randoms) / orders,
        "random_tpf_range": [min(r.tpf for r in randoms), max(r.tpf for r in randoms)],
        "random_mean_accuracy": sum(r.accuracy for r in randoms) / orders,
        "per_problem_mean": {key: float(np.mean([r[key] for r in rows])) for key in ("lopa_tpf", "best", "median", "worst")},
        "lopa_at_or_above_best": sum(r["lopa_tpf"] >= r["best"] for r in rows) / len(rows),
        "lopa_below_median": sum(r["lopa_tpf"] < r["median"] for r in rows) / len(rows),
        "mean_percentile": float(np.mean(pct)),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's coefficient)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def _corr(a: list[float], b: list[float]) -> dict:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return {"n": len(x), "pearson": float("nan"), "spearman": float("nan")}
    return {"n": len(x), "pearson": float(np.corrcoef(x, y)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])}


def predictor_check(model: LopaModel, problems: list[Problem], cfg: DecodeConfig, progress: bool = False) -> dict:
    scores, fills, step_rho, winner_score, next_fill = [], [], [], [], []
    steps = agree = infinite = 0
    regret = 0.0
    for result in generate_many(model, [p.prompt for p in problems], cfg.replace(trace=True)):
        trace = result.trace
        for t, step in enumerate(trace):
            if not step.fills:
                continue
            steps += 1
            agree += step.fills[step.winner] == max(step.fills)
            regret += max(step.fills) - step.fills[step.winner]
            finite = [(s, f) for s, f in zip(step.scores, step.fills) if math.isfinite(s)]
            infinite += len(step.scores) - len(finite)
            scores += [s for s, _ in finite]
            fills += [f for _, f in finite]
            rho = _corr([s for s, _ in finite], [f for _, f in finite])["spearman"]
            if not math.isnan(rho):
                step_rho.append(rho)
            if t + 1 < len(trace) and math.isfinite(step.scores[step.winner]):
                winner_score.append(step.scores[step.winner])
                next_fill.append(len(trace[t + 1].filled))
    return {
        "n": len(problems), "branching_steps": steps, "infinite_scores": infinite,
        "score_vs_fill": _corr(scores, fills),
        "per_step_spearman": {"steps": len(step_rho), "mean": float(np.mean(step_rho)) if step_rho else float("nan"),
                              "median": float(np.median(step_rho)) if step_rho else float("nan")},
        "winner_fills_most": agree / max(1, steps),
        "mean_regret_positions": regret / max(1, steps),
        "winner_score_vs_next_fill": _corr(winner_score, next_fill),
        "points": {"score": scores, "fill": fills, "step_spearman": step_rho},
    }


def run_checks(model: LopaModel, problems: list[Problem], cfg: DecodeConfig, checks: list[str], orders: int = 100,
               tfo_n: int | None = None, progress: bool = False) -> dict:
    """The named checks at one LoPA config; the TFO check on the first tfo_n problems (it decodes each N+1 times)."""
    out: dict = {"config": {"k": cfg.k, "tau": cfg.tau, "branch_confidence": cfg.branch_confidence}}
    if "lookahead" in checks:
        out["lookahead"] = lookahead_check(model, problems, cfg, progress)
    if "tfo" in checks:
        out["tfo"] = tfo_check(model, problems[:tfo_n], cfg, orders, progress)
    if "predictor" in checks:
        out["predictor"] = predictor_check(model, problems, cfg, progress)
    return out


def markdown(result: dict) -> str:
    lines = []
    if "lookahead" in result:
        a, b = result["lookahead"]["summary"]
        p = result["lookahead"]["paired"]
        lines += ["## What the lookahead buys (k = 0 vs k)", "",
                  "| run | n | accuracy | TPF | decode forwards | rows per token |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['label']} | {s['n']} | {100 * s['accuracy']:.1f}% | {s['tpf']:.2f} | {s['decode_forwards']} | "
                  f"{s['rows_per_token']:.2f} |" for s in (a, b)]
        lines += ["", f"Paired on the same {p['n']} problems: TPF ratio {p['tpf_ratio']:.2f}x, accuracy "
                      f"{100 * p['difference']:+.1f} points (95% score interval {100 * p['ci95'][0]:+.1f} to "
                      f"{100 * p['ci95'][1]:+.1f}).", ""]
    if "tfo" in result:
        t = result["tfo"]
        m = t["per_problem_mean"]
        lines += [f"## Token-filling orders: {t['orders']} random orders per problem, {t['n']} problems", "",
                  f"LoPA's order: TPF {t['lopa']['tpf']:.2f}, accuracy {100 * t['lopa']['accuracy']:.1f}%. Random orders: "
                  f"TPF {t['random_mean_tpf']:.2f} on average (runs from {t['random_tpf_range'][0]:.2f} to "
                  f"{t['random_tpf_range'][1]:.2f}), accuracy {100 * t['random_mean_accuracy']:.1f}%.", "",
                  "| per-problem TPF (mean over problems) | LoPA | best random | median random | worst random |",
                  "|---|---|---|---|---|",
                  f"| | {m['lopa_tpf']:.2f} | {m['best']:.2f} | {m['median']:.2f} | {m['worst']:.2f} |", "",
                  f"LoPA's TPF is at or above the best of the {t['orders']} random orders on "
                  f"{100 * t['lopa_at_or_above_best']:.0f}% of problems and below their median on "
                  f"{100 * t['lopa_below_median']:.0f}%; its mean percentile among them is {100 * t['mean_percentile']:.0f}.", ""]
    if "predictor" in result:
        q = result["predictor"]
        c, w, s = q["score_vs_fill"], q["winner_score_vs_next_fill"], q["per_step_spearman"]
        lines += ["## Is Eq. 2 a good predictor?", "",
                  f"{q['branching_steps']} branching iterations over {q['n']} problems; {c['n']} (branch, iteration) pairs "
                  f"with a finite score ({q['infinite_scores']} branches had nothing left to fill and scored +inf).", "",
                  "| relation | n | Pearson | Spearman |", "|---|---|---|---|",
                  f"| branch score vs positions it would fill | {c['n']} | {c['pearson']:.2f} | {c['spearman']:.2f} |",
                  f"| winner's score vs positions filled one iteration later | {w['n']} | {w['pearson']:.2f} | {w['spearman']:.2f} |",
                  "", f"Within one iteration (rank correlation across its branches): mean {s['mean']:.2f}, median "
                      f"{s['median']:.2f} over {s['steps']} iterations. The winner is a branch that fills the most on "
                      f"{100 * q['winner_fills_most']:.0f}% of iterations; on average it fills "
                      f"{q['mean_regret_positions']:.2f} positions fewer than the best branch of its iteration.", ""]
    return "\n".join(lines)


def write_checks(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "checks.json").write_text(json.dumps(result, indent=1))
    (out / "checks.md").write_text(markdown(result))
    plot_checks(result, out)


def plot_checks(result: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if "lookahead" in result:
        pts = np.asarray(result["lookahead"]["per_problem_tpf"])
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.5)
        top = float(pts.max()) if len(pts) else 1.0
        ax.plot([0, top], [0, top], color="gray", lw=0.8)
        ax.set_xlabel("TPF, LoPA k = 0 (batch of one)")
        ax.set_ylabel(f"TPF, LoPA k = {result['config']['k']}")
        ax.set_title("what the lookahead buys, per problem")
        fig.tight_layout()
        fig.savefig(out / "checks_lookahead.png", dpi=110)
        plt.close(fig)
    if "tfo" in result:
        rows = sorted(result["tfo"]["problems"], key=lambda r: r["median"])
        x = np.arange(len(rows))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.fill_between(x, [r["worst"] for r in rows], [r["best"] for r in rows], alpha=0.3, label="random orders: worst..best")
        ax1.plot(x, [r["median"] for r in rows], lw=1, label="random orders: median")
        ax1.scatter(x, [r["lopa_tpf"] for r in rows], s=8, color="C3", label="LoPA's order", zorder=3)
        ax1.set_xlabel("problem (sorted by median random TPF)")
        ax1.set_ylabel("TPF")
        ax1.legend(fontsize=8)
        ax2.hist([r["percentile"] for r in rows], bins=20, range=(0, 1))
        ax2.set_xlabel(f"LoPA's percentile among {result['tfo']['orders']} random orders")
        ax2.set_ylabel("problems")
        fig.tight_layout()
        fig.savefig(out / "checks_tfo.png", dpi=110)
        plt.close(fig)
    if "predictor" in result:
        pts = result["predictor"]["points"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(pts["fill"]))
        ax1.scatter(pts["score"], np.asarray(pts["fill"]) + jitter, s=3, alpha=0.2)
        ax1.set_xlabel(f"branch confidence ({result['config']['branch_confidence']})")
        ax1.set_ylabel("positions the branch would fill (jittered)")
        ax2.hist(pts["step_spearman"], bins=20, range=(-1, 1))
        ax2.set_xlabel("rank correlation within one iteration")
        ax2.set_ylabel("iterations")
        fig.tight_layout()
        fig.savefig(out / "checks_predictor.png", dpi=110)
        plt.close(fig)
