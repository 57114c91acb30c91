"""The paper's missing checks (lookahead, token-filling orders, Eq. 2 as a predictor) and the eval options for
branch scores and budgets, on a tiny random model."""

import json
import math

import pytest
from typer.testing import CliRunner

import lopa
from lopa.cli import app
from lopa.eval.checks import _corr, _percentile, run_checks, write_checks
from lopa.eval.tasks import gsm8k


def test_percentile_and_rank_correlation():
    assert _percentile(5.0, [1.0, 2.0, 5.0, 9.0]) == pytest.approx(0.625)  # two below, one tie (half)
    c = _corr([1, 2, 3, 4], [10, 20, 30, 1000])
    assert c["spearman"] == pytest.approx(1.0) and c["pearson"] < 1.0
    assert math.isnan(_corr([1, 1, 1], [1, 2, 3])["spearman"])  # no variance: undefined


def test_checks_on_a_tiny_model(tiny_dream_dir, tmp_path):
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    cfg = lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8)
    result = run_checks(model, gsm8k(None, 2), cfg, ["lookahead", "tfo", "predictor"], orders=3)
    k0, k2 = result["lookahead"]["summary"]
    assert (k0["label"], k2["label"]) == ("lopa k=0", "lopa k=2") and k0["rows_per_token"] <= k2["rows_per_token"]
    tfo = result["tfo"]
    assert tfo["n"] == 2 and all(len(p["random_tpf"]) == 3 and p["worst"] <= p["median"] <= p["best"] for p in tfo["problems"])
    pred = result["predictor"]
    assert pred["branching_steps"] >= 1 and len(pred["points"]["score"]) == len(pred["points"]["fill"]) > 0
    assert 0.0 <= pred["winner_fills_most"] <= 1.0 and pred["mean_regret_positions"] >= 0.0
    write_checks(result, tmp_path)
    assert "What the lookahead buys" in (tmp_path / "checks.md").read_text()
    assert all((tmp_path / f"checks_{name}.png").stat().st_size > 0 for name in ("lookahead", "tfo", "predictor"))


def test_eval_sweeps_scores_and_budgets_and_runs_checks(tiny_dream_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "lopa", "--k", "2",
                                   "--gen-length", "16", "--branch-confidence", "mean,count", "--k-policy", "fixed,text",
                                   "--checks", "lookahead", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "eval.json").read_text())
    labels = [s["label"] for s in payload["summary"]]
    assert labels == ["lopa k=2 score=mean budget=fixed", "lopa k=2 score=mean budget=text",
                      "lopa k=2 score=count budget=fixed", "lopa k=2 score=count budget=text"]
    assert payload["configs"][labels[3]]["branch_confidence"] == "count" and payload["configs"][labels[3]]["k_policy"] == "text"
    assert {(p["a"], p["b"]) for p in payload["paired"]} >= {(labels[0], label) for label in labels[1:]}
    assert all(s["branch_rows"] >= s["decode_forwards"] for s in payload["summary"])
    assert "rows per token" in (tmp_path / "eval.md").read_text() and (tmp_path / "checks.json").is_file()


@pytest.mark.parametrize("args,field", [(["--checks", "nope"], "checks"), (["--branch-confidence", "nope"], "branch_confidence"),
                                        (["--k-policy", "nope"], "k_policy")])
def test_eval_refuses_unknown_checks_scores_and_budgets(tiny_dream_dir, tmp_path, args, field):
    res = CliRunner().invoke(app, ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "lopa", "--out", str(tmp_path),
                                   "--device", "cpu", *args])
    assert res.exit_code == 2 and field in res.output
