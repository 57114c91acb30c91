"""The `lopa` CLI through Typer's runner: output, stats line, trace file, and typed errors with exit code 2."""

import json

from typer.testing import CliRunner

from lopa.cli import app

runner = CliRunner()


def test_generate_prints_text_and_writes_trace(tiny_dream_dir, tmp_path):
    trace = tmp_path / "trace.json"
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "--prompt", "hello there", "--strategy", "lopa",
                              "--k", "2", "--gen-length", "16", "--block-size", "8", "--device", "cpu",
                              "--trace", str(trace)])
    assert res.exit_code == 0, res.output
    record = json.loads(trace.read_text())
    assert record["config"]["k"] == 2 and record["config"]["strategy"] == "lopa"
    assert record["stats"]["decode_forwards"] == len(record["trace"]) >= 1
    assert record["stats"]["generated_tokens"] == len(record["token_ids"])


def test_generate_json_output(tiny_llada_dir):
    res = runner.invoke(app, ["generate", str(tiny_llada_dir), "-p", "abc", "--strategy", "d2f", "--gen-length", "16",
                              "--block-size", "8", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert payload["stats"]["tpf"] > 0


def test_bad_tau_exits_with_a_clear_error(tiny_dream_dir):
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "x", "--tau", "1.5", "--device", "cpu"])
    assert res.exit_code == 2
    assert "tau" in res.output and "Traceback" not in res.output


def test_missing_model_folder(tmp_path):
    res = runner.invoke(app, ["generate", str(tmp_path / "missing"), "-p", "x", "--device", "cpu"])
    assert res.exit_code == 2 and "CheckpointError" in res.output


def test_info(tiny_dream_dir):
    res = runner.invoke(app, ["info", str(tiny_dream_dir)])
    assert res.exit_code == 0 and "model_type dream" in res.output


def test_demo_prints_the_side_by_side_table(tiny_dream_dir):
    res = runner.invoke(app, ["demo", str(tiny_dream_dir), "--n", "1", "--k", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "| threshold | 1 |" in res.stdout and "| lopa k=2 | 1 |" in res.stdout


def test_default_model_loads_and_is_a_dream_folder():
    import lopa

    model = lopa.load_model(runner=lopa.RunnerConfig(device="cpu"))
    assert model.model_type == "dream" and model.config.num_layers == 8
    assert model.loaded.spec.mask_id == model.tokenizer.token_id("<|mask|>")


def test_eval_compare_with_an_unknown_label_is_a_clear_error(tiny_dream_dir, tmp_path):
    res = runner.invoke(app, ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "d2f", "--compare", "d2f,nope",
                              "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 2 and "compare" in res.output and "Traceback" not in res.output


def test_train_flags_default_to_the_train_config():
    from lopa.train.trainer import TrainConfig

    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and str(TrainConfig.n_train) in res.output.replace(",", "").replace("_", "")


def test_generate_on_two_devices_matches_one_and_reports_branch_parallel(tiny_dream_dir):
    args = ["generate", str(tiny_dream_dir), "-p", "hello there", "--strategy", "lopa", "--k", "3", "--gen-length",
            "16", "--block-size", "8", "--device", "cpu", "--dtype", "float64", "--json"]
    one, two = runner.invoke(app, args), runner.invoke(app, [*args, "--devices", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    a, b = (json.loads(r.stdout[r.stdout.index("{"):]) for r in (one, two))
    assert b["token_ids"] == a["token_ids"] and "branch_parallel" not in a
    bp = b["branch_parallel"]
    assert bp["devices"] == 2 and bp["gathers"] > 0 and bp["broadcasts"] > 0 and bp["forward_s"] > 0
