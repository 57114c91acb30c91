"""Run strategies side by side on the same problems and report what each cost and scored.

Counting, as everywhere in lopa: tokens are generated tokens up to and including the first EOS; forwards
are decode forwards (a LoPA forward that verifies k+1 branches counts once); prefill is reported apart.
TPF is total tokens / total decode forwards over the run (`tpf`), and the mean of per-problem TPF
(`mean_problem_tpf`). The problems of one strategy are decoded concurrently, up to the model's
RunnerConfig.max_num_seqs at a time (`lopa eval --batch-size`); tokens/s is the strategy's generated tokens
over the wall seconds of the engine's decode steps for it (prefill apart), so it is throughput when batched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..api import LopaModel, generate_many
from ..config import DecodeConfig
from ..problems.gsm import extract_answer
from .sandbox import check_humaneval
from .stats import paired_interval
from .tasks import Problem

CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass
class Record:
    problem: str
    correct: bool
    tokens: int
    forwards: int
    prefill_forwards: int
    decode_s: float
    hit_round_cap: bool
    prediction: str | None
    returned: int = 0  # ids the strategy returned (compat "published": every block, past EOS); `tokens` counts to EOS
    text: str = ""  # the generated text, as the model wrote it (before any scoring cut)
    branch_rows: int = 0  # rows (branches) summed over the decode forwards: the compute LoPA's lookahead costs


@dataclass
class StrategyReport:
    label: str
    config: dict
    records: list[Record] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # the engine's counters over this strategy's run (steps, seconds)

    def _sum(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.records)

    @property
    def accuracy(self) -> float:
        return self._sum("correct") / len(self.records) if self.records else 0.0

    @property
    def tpf(self) -> float:
        return self._sum("tokens") / max(1, self._sum("forwards"))

    @property
    def mean_problem_tpf(self) -> float:
        return sum(r.tokens / max(1, r.forwards) for r in self.records) / max(1, len(self.records))

    @property
    def rows_per_token(self) -> float:
        """Branch rows computed per generated token (k+1 per forward for fixed-k LoPA, 1 for d2f)."""
        return self._sum("branch_rows") / max(1, self._sum("tokens"))

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the engine's decode steps (throughput when requests share steps)."""
        return self._sum("tokens") / max(1e-9, self.engine.get("decode_s", self._sum("decode_s")))

    def summary(self) -> dict:
        return {"label": self.label, "n": len(self.records), "accuracy": self.accuracy, "tpf": self.tpf,
                "mean_problem_tpf": self.mean_problem_tpf, "tokens": self._sum("tokens"),
                "decode_forwards": self._sum("forwards"), "prefill_forwards": self._sum("prefill_forwards"),
                "decode_s": self._sum("decode_s"), "tokens_per_s": self.tokens_per_s,
                "round_cap_hits": self._sum("hit_round_cap"), "engine": self.engine,
                "branch_rows": self._sum("branch_rows"), "rows_per_token": self.rows_per_token}


def score(problem: Problem, text: str) -> tuple[bool, str | None]:
    if problem.task == "gsm8k":
        got = extract_answer(text)
        return got == problem.reference, got
    completion = text
    for stop in CODE_STOPS:
        completion = completion.split(stop)[0]
    outcome = check_humaneval(problem.prompt, completion, problem.reference, problem.entry_point)
    return outcome.passed, outcome.status


def run_eval(model: LopaModel, problems: list[Problem], strategies: dict[str, DecodeConfig],
             progress: bool = True) -> list[StrategyReport]:
    """Every strategy on every problem, in the same order (so results pair up); one strategy's problems are
    decoded concurrently by the engine (up to RunnerConfig.max_num_seqs at once)."""
    reports = [StrategyReport(label, asdict(cfg)) for label, cfg in strategies.items()]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(problems) * len(strategies))
        for report, cfg in zip(reports, strategies.values()):
            bar.update(task, description=f"{report.label:>12}")
            before = dataclasses.replace(model.engine.counters)
            results = generate_many(model, [p.prompt for p in problems], cfg, on_result=lambda i, r: bar.advance(task))
            after = model.engine.counters
            report.engine = {"decode_steps": after.decode_steps - before.decode_steps,
                             "prefill_steps": after.prefill_steps - before.prefill_steps,
                             "decode_s": after.decode_s - before.decode_s, "prefill_s": after.prefill_s - before.prefill_s,
                             "requests_per_step": (after.requests - before.requests)
                             / max(1, after.decode_steps - before.decode_steps)}
            for problem, res in zip(problems, results):
                ok, pred = score(problem, res.text)
                s = res.stats
                report.records.append(Record(problem.id, ok, s.generated_tokens, s.decode_forwards,
                                             s.prefill_forwards, s.decode_s, s.hit_round_cap, pred, len(res.token_ids),
                                             res.text, s.branch_rows))
    return reports


def paired_difference(a: StrategyReport, b: StrategyReport) -> dict:
    """Accuracy of b minus a, problem by problem, with Tango's 95% score interval for paired proportions
    (eval/stats.py: inside ±1 and of positive width at any n). Two different runs on the same problems only
    (their labels may match: the same strategy under two models or precisions)."""
    if a is b:
        raise ValueError(f"paired_difference: {a.label!r} paired with itself")
    pairs = list(zip(a.records, b.records, strict=True))
    if not pairs:
        raise ValueError("paired_difference: no problems to pair")
    gain = sum(y.correct and not x.correct for x, y in pairs)
    loss = sum(x.correct and not y.correct for x, y in pairs)
    n = len(pairs)
    return {"a": a.label, "b": b.label, "n": n, "difference": (gain - loss) / n,
            "ci95": list(paired_interval(gain, loss, n)), "interval": "Tango score, paired",
            "b_only_correct": gain, "a_only_correct": loss,
            "tpf_ratio": b.tpf / a.tpf if a.tpf else float("nan")}


def markdown(reports: list[StrategyReport], pairs: list[dict]) -> str:
    lines = ["| strategy | n | accuracy | TPF | mean per-problem TPF | decode forwards | tokens | tokens/s | round-cap hits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        s = r.summary()
        lines.append(f"| {s['label']} | {s['n']} | {100 * s['accuracy']:.1f}% | {s['tpf']:.2f} | {s['mean_problem_tpf']:.2f} | "
                     f"{s['decode_forwards']} | {s['tokens']} | {s['tokens_per_s']:.0f} | {s['round_cap_hits']} |")
    lines += branch_cost_table(reports)
    randoms = [r for r in reports if r.label.startswith("random-tfo")]
    if randoms:
        k_label = randoms[0].label.split()[1]  # "k=N"
        tpfs = [r.tpf for r in randoms]
        accs = [100 * r.accuracy for r in randoms]
        same_run = " ".join(["lopa"] + [p for p in randoms[0].label.split()[1:] if not p.startswith("seed=")])
        chosen = next((r for r in reports if r.label == same_run), None)  # "lopa k=N" (and its " tau=T")
        lines.append("")
        lines.append(f"Random token-filling orders ({len(randoms)} seeds, a random winner among the same {k_label} "
                     f"branches): TPF {sum(tpfs) / len(tpfs):.2f} (min {min(tpfs):.2f}, max {max(tpfs):.2f}), accuracy "
                     f"{sum(accs) / len(accs):.1f}%" + (f"; the order LoPA picked: TPF {chosen.tpf:.2f}, accuracy "
                                                        f"{100 * chosen.accuracy:.1f}%." if chosen else "."))
    for p in pairs:
        lines.append("")
        lines.append(f"Paired, {p['b']} vs {p['a']} on the same {p['n']} problems: accuracy difference "
                     f"{100 * p['difference']:+.1f} points (95% score interval {100 * p['ci95'][0]:+.1f} to "
                     f"{100 * p['ci95'][1]:+.1f}; {p['b_only_correct']} right only with {p['b']}, "
                     f"{p['a_only_correct']} only with {p['a']}); TPF ratio {p['tpf_ratio']:.2f}x.")
    return "\n".join(lines) + "\n"


def branch_cost_table(reports: list[StrategyReport]) -> list[str]:
    """What the lookahead costs in compute: rows per forward and per generated token (one row = one branch)."""
    lines = ["", "| strategy | branch rows | rows per forward | rows per token |", "|---|---|---|---|"]
    for r in reports:
        s = r.summary()
        lines.append(f"| {s['label']} | {s['branch_rows']} | {s['branch_rows'] / max(1, s['decode_forwards']):.2f} | "
                     f"{s['rows_per_token']:.2f} |")
    return lines


def write_reports(reports: list[StrategyReport], pairs: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": [r.summary() for r in reports], "paired": pairs,
               "records": {r.label: [asdict(x) for x in r.records] for r in reports},
               "configs": {r.label: r.config for r in reports}}
    (out / "eval.json").write_text(json.dumps(payload, indent=1))
    (out / "eval.md").write_text(markdown(reports, pairs))
    plot(reports, out)


def plot(reports: list[StrategyReport], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in reports:
        ax1.scatter(r.tpf, 100 * r.accuracy, s=40)
        ax1.annotate(r.label, (r.tpf, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax2.hist([x.tokens / max(1, x.forwards) for x in r.records], bins=30, alpha=0.5, label=r.label)
    ax1.set_xlabel("TPF (tokens per decode forward)")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("TPF vs accuracy")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("TPF per problem")
    ax2.set_ylabel("problems")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=110)
