"""The `lopa` CLI through Typer's runner: output, stats line, trace file, and typed errors with exit code 2."""

import json
import re

import pytest

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
    note = " ".join(res.stdout.split())  # the CPU note, unwrapped: this run's rows per token, then the GPU's numbers
    assert "Reading tokens/s on a CPU: every branch row costs compute" in note
    assert "lopa k=2: TPF" in note and "branch rows per token" in note
    assert "TPF is what it turns into speed" in note and "one NVIDIA H100" in note
    assert "d2f TPF 2.76, 2078 tokens/s; lopa k=14 TPF 7.67, 4908 tokens/s" in note


def test_the_gpu_figures_the_demo_quotes_are_the_recorded_run():
    """GPU_MEASURED must be docs/results/main_1000's numbers, the run docs/results.md reports (on an H100)."""
    from pathlib import Path

    from lopa.cli import GPU_MEASURED

    docs = Path(__file__).resolve().parents[1] / "docs"
    run = json.loads((docs / "results/main_1000/eval.json").read_text())
    assert run["meta"]["device"] == "cuda" and "GPU runs: one NVIDIA H100" in (docs / "results.md").read_text()
    recorded = {s["label"]: (round(s["tpf"], 2), round(s["tokens_per_s"])) for s in run["summary"]}
    assert {label: recorded[label] for label in GPU_MEASURED} == GPU_MEASURED


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
TRICKY = "x" * 120 + "  two  spaces :rocket: [bold]not bold[/bold]\n\tend \\n [red]"


def test_generate_prints_the_text_byte_for_byte(tiny_dream_dir, monkeypatch):
    """Whatever text the API returns reaches stdout unchanged (no rewrapping, markup or emoji), plus one newline."""
    import lopa

    args = ["-p", "hello", "--strategy", "lopa", "--k", "2", "--gen-length", "40", "--block-size", "8",
            "--temperature", "5", "--seed", "3", "--device", "cpu"]
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    text = lopa.generate(model, "hello", strategy="lopa", k=2, gen_length=40, block_size=8, temperature=5.0, seed=3).text
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), *args])
    assert res.exit_code == 0, res.output
    assert res.stdout == text + "\n" and "TPF" in res.stderr and "TPF" not in res.stdout

    from lopa.models.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, skip_special=True: TRICKY)
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), *args])
    assert res.exit_code == 0 and res.stdout_bytes == (TRICKY + "\n").encode()
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), *args, "--json"])
    assert json.loads(res.stdout)["text"] == TRICKY and len(res.stdout.splitlines()) == 1


@pytest.mark.parametrize("strategy", ["threshold", "d2f", "lopa"])
def test_generate_in_float64(tiny_dream_dir, strategy):
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "abc", "--strategy", strategy, "--k", "2",
                              "--gen-length", "16", "--block-size", "8", "--device", "cpu", "--dtype", "float64"])
    assert res.exit_code == 0, res.output


def test_eval_table_on_stdout_answers_in_json_and_pairs_by_tau(tiny_dream_dir, tmp_path):
    res = runner.invoke(app, ["eval", str(tiny_dream_dir), "--n", "1", "--strategies", "d2f,lopa", "--k", "2",
                              "--tau", "0.5,0.9", "--random-tfo", "1", "--gen-length", "16", "--out", str(tmp_path),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "| d2f tau=0.5 | 1 |" in res.stdout and "| random-tfo k=2 seed=0 tau=0.5 | 1 |" in res.stdout
    payload = json.loads((tmp_path / "eval.json").read_text())
    assert payload["meta"]["data"].startswith("lopa's generated")
    record = payload["records"]["lopa k=2 tau=0.9"][0]
    assert isinstance(record["text"], str) and record["text"]
    pairs = {p["b"]: p["a"] for p in payload["paired"]}
    assert pairs == {"lopa k=2 tau=0.5": "d2f tau=0.5", "lopa k=2 tau=0.9": "d2f tau=0.9",
                     "random-tfo k=2 seed=0 tau=0.5": "d2f tau=0.5"}
    assert "the order LoPA picked" in res.stdout


def test_eval_records_the_task_data_source(tiny_dream_dir, tmp_path):
    res = runner.invoke(app, ["eval", str(tiny_dream_dir), "--task", "code", "--n", "1", "--strategies", "d2f",
                              "--gen-length", "16", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "lopa.problems.code" in json.loads((tmp_path / "eval.json").read_text())["meta"]["data"]


def test_help_shows_the_defaults():
    from lopa import DecodeConfig

    def flat_help(command):  # Rich wraps help into boxes: compare without whitespace and box lines
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0
        return re.sub(r"[\s│]+", "", res.output)

    d = DecodeConfig()
    for command in ("generate", "demo", "eval"):
        assert f"[default:{d.k};" in flat_help(command), command
    text = flat_help("generate")
    for value in (d.gen_length, d.tau, d.block_size):
        assert f"[default:{value}" in text


def test_dream_sampler_defaults_give_an_answer_on_the_embedded_model():
    from lopa.config import STRATEGY_DEFAULTS
    from lopa.eval.tasks import gsm8k

    res = runner.invoke(app, ["generate", "-p", gsm8k(None, 1)[0].prompt, "--strategy", "dream", "--device", "cpu",
                              "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["text"].strip() and payload["stats"]["decode_forwards"] == STRATEGY_DEFAULTS["dream"]["gen_length"]


def test_generate_prompts_file_decodes_concurrently_and_matches_the_api(tiny_dream_dir, tmp_path):
    """--prompts-file: plain lines or JSONL (with per-prompt fields and chats); JSONL out in the file's order,
    each result equal to lopa.generate alone; one engine step serves several requests."""
    import lopa

    plain = tmp_path / "prompts.txt"
    plain.write_text("hello there\n\nthe cat sat\nx y z\n")
    common = ["--strategy", "lopa", "--k", "2", "--gen-length", "16", "--block-size", "8", "--device", "cpu"]
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "--prompts-file", str(plain), *common])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    for i, p in enumerate(["hello there", "the cat sat", "x y z"]):
        alone = lopa.generate(model, p, strategy="lopa", k=2, gen_length=16, block_size=8)
        assert rows[i]["index"] == i and rows[i]["token_ids"] == alone.token_ids and rows[i]["text"] == alone.text
        assert rows[i]["stats"]["decode_forwards"] == alone.stats.decode_forwards
    assert "requests and" in res.stderr and "per step" in res.stderr
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Question:\nAnswer:\n", "k": 0, "strategy": "d2f"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "--prompts-file", str(jsonl), *common])
    assert res.exit_code == 0, res.output
    first, chat = [json.loads(line) for line in res.stdout.splitlines()]
    assert first["token_ids"] == lopa.generate(model, "Question:\nAnswer:\n", strategy="d2f", k=0, gen_length=16,
                                               block_size=8).token_ids
    assert chat["token_ids"] == lopa.generate(model, messages=[{"role": "user", "content": "hi"}], strategy="lopa",
                                              k=2, gen_length=16, block_size=8).token_ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "kk": 3}\n')
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "--prompts-file", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and "kk" in res.stderr and "Traceback" not in res.output


def test_plain_output_is_the_json_text_byte_for_byte_in_a_real_process():
    """A real stdout (not the test runner's): '\\r', U+2028 and non-ASCII text reach it as the UTF-8 bytes of
    --json's text, even where Python's text layer is ASCII."""
    import os
    import subprocess
    import sys

    script = ("from lopa.models.tokenizer import Tokenizer\n"
              "Tokenizer.decode = lambda self, ids, skip_special=True: 'a\\rb\\r\\nc \\u00e9\\u2028 d'\n"
              "from lopa.cli import app\napp()\n")
    args = [sys.executable, "-c", script, "generate", "-p", "hi", "--gen-length", "8", "--block-size", "8",
            "--device", "cpu"]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    plain = subprocess.run(args, capture_output=True, env=env, timeout=600)
    as_json = subprocess.run([*args, "--json"], capture_output=True, env=env, timeout=600)
    assert plain.returncode == 0 and as_json.returncode == 0, plain.stderr + as_json.stderr
    text = json.loads(as_json.stdout)["text"]
    assert text == "a\rb\r\nc \u00e9\u2028 d" and plain.stdout == (text + "\n").encode("utf-8")


def test_eval_takes_an_adapter_and_every_decoding_flag(tiny_dream_dir, tmp_path):
    from lopa.models.tiny import write_tiny_adapter

    adapter = write_tiny_adapter(tmp_path / "adapter", tiny_dream_dir, r=2)
    res = runner.invoke(app, ["eval", str(tiny_dream_dir), "--adapter", str(adapter), "--n", "1", "--strategies",
                              "lopa", "--k", "2", "--branch-m", "3", "--branch-confidence", "top_m", "--gen-length",
                              "16", "--block-size", "8", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert payload["meta"]["adapter"] == str(adapter)
    assert list(payload["configs"]) == ["lopa k=2 score=top_m"]
    assert payload["configs"]["lopa k=2 score=top_m"]["branch_m"] == 3


def test_a_byte_order_mark_on_stdin_is_not_part_of_the_prompt(tiny_dream_dir, tmp_path):
    import lopa

    trace = tmp_path / "t.json"
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "-", "--gen-length", "8", "--block-size", "8",
                              "--device", "cpu", "--trace", str(trace)], input="\ufeffhello there".encode())
    assert res.exit_code == 0, res.output
    tokenizer = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu")).tokenizer
    assert json.loads(trace.read_text())["prompt_ids"] == tokenizer.encode("hello there")


def test_a_reader_that_stops_early_ends_the_command_quietly(monkeypatch, tmp_path):
    """`lopa generate --prompts-file ... | head -1`: the next write meets a closed pipe; the command stops with
    exit 141 (as a SIGPIPE'd tool does), no traceback, and nothing is left to fail at interpreter exit."""
    import io
    import sys

    import typer

    from lopa import cli

    spare = open(tmp_path / "stdout", "wb")

    class ClosedPipe(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return spare.fileno()

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(ClosedPipe())))
    with pytest.raises(typer.Exit) as info:
        cli._emit("x" * 100_000 + "\n")
    assert info.value.exit_code == 141
    spare.close()
