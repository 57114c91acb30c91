"""The evaluation harness: tasks, scoring, the sandbox, side-by-side runs, paired comparison, reports."""

import json

import pytest

import lopa
from lopa.errors import ConfigError
from lopa.eval.harness import Record, StrategyReport, paired_difference, run_eval, write_reports
from lopa.eval.sandbox import check_humaneval, run_program
from lopa.eval.tasks import gsm8k, humaneval


def test_gsm8k_jsonl_and_generated_split(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    (p,) = gsm8k(path)
    assert p.reference == "5" and p.prompt.startswith("Question: What is 2 + 3?")
    assert len(gsm8k(None, 7)) == 7
    path.write_text("{not json}\n")
    with pytest.raises(ConfigError, match="line 1"):
        gsm8k(path)
    with pytest.raises(ConfigError, match="not found"):
        gsm8k(tmp_path / "missing.jsonl")


def test_humaneval_ships_164_problems():
    problems = humaneval()
    assert len(problems) == 164 and problems[0].entry_point and "def " in problems[0].prompt


def test_sandbox_pass_fail_timeout_and_no_network():
    assert run_program("assert 1 + 1 == 2").passed
    failed = run_program("assert 1 + 1 == 3")
    assert not failed.passed and failed.status == "failed"
    assert run_program("while True: pass", timeout_s=1).status == "timeout"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not net.passed and "network" in net.detail
    prompt = "def add(a, b):\n"
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    assert check_humaneval(prompt, "    return a + b\n", test, "add").passed
    assert not check_humaneval(prompt, "    return a - b\n", test, "add").passed


def test_paired_difference():
    a, b = StrategyReport("a", {}), StrategyReport("b", {})
    for i, (x, y) in enumerate([(1, 1), (0, 1), (1, 0), (0, 1)]):
        a.records.append(Record(str(i), bool(x), 10, 5, 1, 0.1, False, None))
        b.records.append(Record(str(i), bool(y), 10, 2, 1, 0.1, False, None))
    p = paired_difference(a, b)
    assert p["difference"] == pytest.approx(0.25) and p["b_only_correct"] == 2 and p["a_only_correct"] == 1
    assert p["ci95"][0] < 0.25 < p["ci95"][1] and p["tpf_ratio"] == pytest.approx(2.5)
    assert -1 <= p["ci95"][0] and p["ci95"][1] <= 1 and p["interval"].startswith("Tango")
    with pytest.raises(ValueError, match="itself"):
        paired_difference(a, a)


def test_eval_never_pairs_a_run_with_itself(tiny_dream_dir, tmp_path):
    """Without a d2f run there is no default baseline: no paired line (and a note why), never lopa vs lopa;
    --compare must name two different runs."""
    from typer.testing import CliRunner

    from lopa.cli import app

    args = ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "lopa", "--k", "2", "--gen-length", "16",
            "--out", str(tmp_path), "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval.json").read_text())["paired"] == []
    assert "Paired" not in res.stdout and "no d2f run" in res.stderr
    res = CliRunner().invoke(app, [*args, "--compare", "lopa k=2,lopa k=2"])
    assert res.exit_code == 2 and "two different run labels" in res.output


def test_run_eval_end_to_end_on_a_tiny_model(tiny_dream_dir, tmp_path):
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    problems = gsm8k(None, 2)
    cfgs = {"d2f": lopa.DecodeConfig(strategy="d2f", gen_length=16, block_size=8),
            "lopa k=2": lopa.DecodeConfig(strategy="lopa", k=2, gen_length=16, block_size=8)}
    reports = run_eval(model, problems, cfgs, progress=False)
    assert [len(r.records) for r in reports] == [2, 2]
    assert all(r.records[0].forwards >= 1 for r in reports)
    write_reports(reports, [paired_difference(*reports)], tmp_path, {"model": "tiny"})
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert payload["summary"][1]["label"] == "lopa k=2" and (tmp_path / "eval.md").read_text().startswith("| strategy")
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_eval_command(tiny_dream_dir, tmp_path):
    from typer.testing import CliRunner

    from lopa.cli import app

    res = CliRunner().invoke(app, ["eval", str(tiny_dream_dir), "--n", "2", "--strategies", "d2f,lopa", "--k", "2,0",
                                   "--gen-length", "16", "--random-tfo", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert [s["label"] for s in summary] == ["d2f", "lopa k=2", "lopa k=0", "random-tfo k=2 seed=0", "random-tfo k=2 seed=1"]
    assert "Random token-filling orders (2 seeds" in (tmp_path / "eval.md").read_text()


def test_code_tasks_canonical_solutions_pass_and_wrong_ones_fail():
    from lopa.problems.code import code_split

    tasks = code_split("test", 12)
    assert len({t["prompt"] for t in tasks}) == 12
    assert not {t["prompt"] for t in tasks} & {t["prompt"] for t in code_split("train", 60)}
    for t in tasks:
        assert check_humaneval(t["prompt"], t["canonical_solution"], t["test"], t["entry_point"]).passed, t
    assert not check_humaneval(tasks[0]["prompt"], "    return None\n", tasks[0]["test"], tasks[0]["entry_point"]).passed


def test_code_task_runs_through_the_harness(tiny_dream_dir, tmp_path):
    from lopa.eval.tasks import code

    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    (report,) = run_eval(model, code(2), {"d2f": lopa.DecodeConfig(strategy="d2f", gen_length=16, block_size=8)},
                         progress=False)
    assert len(report.records) == 2 and all(r.prediction in ("passed", "failed", "timeout") for r in report.records)


def test_tau_sweep_pairs_each_lopa_run_with_the_d2f_run_of_the_same_tau(tiny_dream_dir, tmp_path):
    from typer.testing import CliRunner

    from lopa.cli import app

    res = CliRunner().invoke(app, ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "d2f,lopa", "--k", "2",
                                   "--tau", "0.5,0.9", "--gen-length", "16", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pairs = json.loads((tmp_path / "eval.json").read_text())["paired"]
    assert [(p["a"], p["b"]) for p in pairs] == [("d2f tau=0.5", "lopa k=2 tau=0.5"), ("d2f tau=0.9", "lopa k=2 tau=0.9")]


def test_asking_for_more_code_tasks_than_exist_is_a_config_error():
    from lopa.eval.tasks import code

    with pytest.raises(ConfigError, match="distinct test code tasks"):
        code(200)  # the test split holds 95: 200 draws per task asked for, then the error


def test_eval_batch_size_decodes_concurrently_with_the_same_records(tiny_dream_dir, tmp_path):
    """`lopa eval --batch-size 4` shares engine steps between problems and records exactly what batch size 1 does."""
    from typer.testing import CliRunner

    from lopa.cli import app

    payloads = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        res = CliRunner().invoke(app, ["eval", str(tiny_dream_dir), "--n", "5", "--strategies", "d2f,lopa", "--k", "2",
                                       "--gen-length", "16", "--batch-size", str(bs), "--out", str(out),
                                       "--device", "cpu"])
        assert res.exit_code == 0, res.output
        payloads.append(json.loads((out / "eval.json").read_text()))
    solo, batched = payloads
    assert batched["meta"]["batch_size"] == 4
    for label in ("d2f", "lopa k=2"):
        key = lambda r: (r["problem"], r["correct"], r["tokens"], r["forwards"], r["prediction"])  # noqa: E731
        assert [key(r) for r in batched["records"][label]] == [key(r) for r in solo["records"][label]]
    engines = [{s["label"]: s["engine"] for s in p["summary"]} for p in payloads]
    assert engines[0]["lopa k=2"]["requests_per_step"] == 1
    assert engines[1]["lopa k=2"]["requests_per_step"] > 1
    assert engines[1]["lopa k=2"]["decode_steps"] < engines[0]["lopa k=2"]["decode_steps"]


@pytest.mark.parametrize("n", [0, -3, 1.5])
def test_task_counts_must_be_positive(n):
    from lopa.eval.tasks import code

    for task in (lambda: gsm8k(None, n), lambda: humaneval(n), lambda: code(n)):
        with pytest.raises(ConfigError, match="n: must be a positive count"):
            task()
