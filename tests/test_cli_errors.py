"""Everything a user can type or point the CLI at that is wrong: exit code 2 and one clear line, never a traceback.

Malformed model / adapter folders (every file lopa reads from one) and malformed arguments, through typer's runner.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from lopa.cli import app
from lopa.models.tiny import write_tiny_adapter

runner = CliRunner()
QUICK = ["--device", "cpu", "--gen-length", "8", "--block-size", "8"]


def _one_clear_line(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert res.stdout == ""


def _set_json(path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


FOLDERS = {  # name -> (how to break a copy of the tiny Dream folder, words the error line must name)
    "config not JSON": (lambda d: (d / "config.json").write_text("{nope"), ["config.json", "JSON"]),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "object"]),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}'), ["config.json", "UTF-8"]),
    "config field wrong type": (lambda d: _set_json(d / "config.json", lambda c: c.update(hidden_size="64")),
                                ["config.json", "hidden_size"]),
    "config field a bool": (lambda d: _set_json(d / "config.json", lambda c: c.update(num_hidden_layers=True)),
                            ["num_hidden_layers"]),
    "config field negative": (lambda d: _set_json(d / "config.json", lambda c: c.update(num_hidden_layers=-1)),
                              ["num_hidden_layers"]),
    "config field missing": (lambda d: _set_json(d / "config.json", lambda c: c.pop("vocab_size")), ["vocab_size"]),
    "config eos list of strings": (lambda d: _set_json(d / "config.json", lambda c: c.update(eos_token_id=["x"])),
                                   ["eos_token_id"]),
    "tokenizer_config not JSON": (lambda d: (d / "tokenizer_config.json").write_text("{"),
                                  ["tokenizer_config.json", "JSON"]),
    "tokenizer_config not an object": (lambda d: (d / "tokenizer_config.json").write_text('"x"'),
                                       ["tokenizer_config.json"]),
    "added tokens malformed": (lambda d: _set_json(d / "tokenizer_config.json",
                                                   lambda c: c.update(added_tokens_decoder={"x": 1})),
                               ["added_tokens_decoder"]),
    "chat_template not a string": (lambda d: _set_json(d / "tokenizer_config.json",
                                                       lambda c: c.update(chat_template=3)), ["chat_template"]),
    "tokenizer.json corrupt": (lambda d: (d / "tokenizer.json").write_text("{"), ["tokenizer"]),
    "weights corrupt": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), ["model.safetensors"]),
    "index without weight_map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"), ["weight_map"]),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("]"), ["index.json"]),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_malformed_model_folder(case, tiny_dream_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dream_dir, folder)
    breaks, words = FOLDERS[case]
    breaks(folder)
    res = runner.invoke(app, ["generate", str(folder), "-p", "hi", *QUICK])
    _one_clear_line(res, *words)


ADAPTERS = {
    "not JSON": (lambda d: (d / "adapter_config.json").write_text("{r: 4"), ["adapter_config.json", "JSON"]),
    "not an object": (lambda d: (d / "adapter_config.json").write_text("4"), ["adapter_config.json"]),
    "r missing": (lambda d: _set_json(d / "adapter_config.json", lambda c: c.pop("r")), ["'r'"]),
    "r a string": (lambda d: _set_json(d / "adapter_config.json", lambda c: c.update(r="4")), ["'r'"]),
    "alpha a string": (lambda d: _set_json(d / "adapter_config.json", lambda c: c.update(lora_alpha="8")),
                       ["lora_alpha"]),
    "tensors corrupt": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"),
                        ["adapter_model.safetensors"]),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_malformed_adapter_folder(case, tiny_dream_dir, tmp_path):
    adapter = write_tiny_adapter(tmp_path / "adapter", tiny_dream_dir, r=2)
    breaks, words = ADAPTERS[case]
    breaks(adapter)
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "hi", "--adapter", str(adapter), *QUICK])
    _one_clear_line(res, "AdapterError", *words)


def test_chat_template_that_does_not_render(tiny_dream_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dream_dir, folder)
    _set_json(folder / "tokenizer_config.json", lambda c: c.update(chat_template="{% for %}"))
    res = runner.invoke(app, ["generate", str(folder), "-p", "hi", "--chat", *QUICK])
    _one_clear_line(res, "chat template")


def test_a_prompt_that_is_not_utf8(tiny_dream_dir):
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "-", *QUICK], input=b"Q \xff\n")
    _one_clear_line(res, "prompt", "UTF-8")


def test_output_paths_are_checked_before_the_work(tiny_dream_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "hi", "--trace", str(blocker / "t.json"), *QUICK])
    _one_clear_line(res, "trace")
    res = runner.invoke(app, ["generate", str(tiny_dream_dir), "-p", "hi", "--trace", str(tmp_path), *QUICK])
    _one_clear_line(res, "trace", "folder")
    # nothing is decoded (the model is not even loaded): the folder argument points nowhere
    res = runner.invoke(app, ["eval", str(tmp_path / "no_model"), "--n", "1", "--out", str(blocker / "sub")])
    _one_clear_line(res, "out", "a_file")
    res = runner.invoke(app, ["eval", str(tmp_path / "no_model"), "--n", "1", "--out", str(blocker)])
    _one_clear_line(res, "out", "not a folder")


BAD_ARGS = {  # lopa-level checks (typer's own usage errors are tested once below)
    "eval k not a number": (["eval", "--k", "x"], ["k"]),
    "eval tau not a number": (["eval", "--tau", "0.9,high"], ["tau"]),
    "eval n zero": (["eval", "--n", "0"], ["n", "positive"]),
    "eval n negative": (["eval", "--n", "-3"], ["n", "positive"]),
    "demo n zero": (["demo", "--n", "0"], ["n", "positive"]),
    "eval random-tfo negative": (["eval", "--random-tfo", "-1"], ["random_tfo"]),
    "eval unknown task": (["eval", "--task", "nope"], ["task"]),
    "eval data for humaneval": (["eval", "--task", "humaneval", "--data", "x.jsonl"], ["data"]),
    "eval data missing": (["eval", "--data", "/no/such.jsonl"], ["data", "not found"]),
    "generate bad dtype": (["generate", "-p", "x", "--dtype", "float8"], ["dtype"]),
    "generate bad device": (["generate", "-p", "x", "--device", "cuda:x"], ["device"]),
    "generate bad quantize": (["generate", "-p", "x", "--quantize", "int4"], ["quantize"]),
    "generate k beyond the engine": (["generate", "-p", "x", "--k", "100000", "--gen-length", "400"],
                                     ["k", "100000", "64", "max_lookahead"]),
    "train bad device": (["train", "--device", "tpu"], ["device"]),
    "train zero minutes": (["train", "--minutes", "0"], ["minutes"]),
    # issue 24: every setting checked the same way at every front end (type, range, finiteness), no silent misread
    "generate tau nan": (["generate", "-p", "x", "--tau", "nan"], ["tau"]),
    "generate temperature inf": (["generate", "-p", "x", "--temperature", "inf"], ["temperature"]),
    "generate negative seed": (["generate", "-p", "x", "--seed", "-1"], ["seed"]),
    "generate k_policy load without a step row budget": (["generate", "-p", "x", "--k-policy", "load"],
                                                         ["k_policy", "step_rows"]),
    "generate prompt beside prompts-file": (["generate", "-p", "x", "--prompts-file", "p.txt"], ["prompt", "not both"]),
    "generate a prompt that is not UTF-8 (argv)": (["generate", "-p", "Q \udcff"], ["prompt", "UTF-8"]),
    "generate the mask token as the prompt": (["generate", "-p", "<|mask|>"], ["prompt", "mask token"]),
    "eval a k listed twice": (["eval", "--k", "2,2"], ["k", "twice"]),
    "eval a strategy listed twice": (["eval", "--strategies", "d2f,d2f", "--n", "1"], ["strategies"]),
    "eval tau nan": (["eval", "--tau", "nan", "--n", "1"], ["tau"]),
    "eval no tfo orders": (["eval", "--checks", "tfo", "--tfo-orders", "0"], ["tfo_orders", "positive"]),
    "eval negative tfo problems": (["eval", "--checks", "tfo", "--tfo-n", "-2"], ["tfo_n", "positive"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_malformed_arguments(case, tmp_path):
    args, words = BAD_ARGS[case]
    if args[0] in ("eval", "train"):
        args = [*args, "--out", str(tmp_path / "out")]
    res = runner.invoke(app, args)
    _one_clear_line(res, *words)


def test_bad_data_files(tmp_path):
    data = tmp_path / "d.jsonl"
    for content, words in [(b"\xff\xfe", ["UTF-8"]), (b'[1]\n', ["line 1", "GSM8K"]),
                           (b'{"question": "q", "answer": 5}\n', ["line 1"]), (b"{x\n", ["line 1", "JSON"])]:
        data.write_bytes(content)
        res = runner.invoke(app, ["eval", "--data", str(data), "--n", "1", "--out", str(tmp_path / "out")])
        _one_clear_line(res, "data", *words)


def test_typer_rejects_a_non_integer_flag_with_exit_2():
    res = runner.invoke(app, ["generate", "-p", "x", "--k", "1.5"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "--k" in res.output
