"""`lopa-lm-eval run --model lopa ...` on a local JSONL task (no hub, no downloads)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lopa[lmeval]')")


ENV = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _local_task(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lopa_local.yaml").write_text(f"""task: lopa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:\\n"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 16
metric_list:
  - metric: exact_match
""")
    return tasks


def test_lm_eval_runs_lopa_on_a_local_generate_until_task(tiny_dream_dir, tmp_path):
    tasks = _local_task(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lopa.eval.lm_eval_adapter", "run", "--model", "lopa",
           "--model_args", f"pretrained={tiny_dream_dir},strategy=lopa,k=2,block_size=8",  # no --device: lopa's auto
           "--tasks", "lopa_local", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = next(out.rglob("results_*.json"))
    payload = json.loads(results.read_text())
    assert "lopa_local" in payload["results"] and payload["config"]["model"] == "lopa"
    samples = list(out.rglob("samples_lopa_local_*.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 3
    stats = json.loads(results.with_name(results.name.replace("results_", "lopa_stats_")).read_text())
    assert stats["requests"] == 3 and stats["decode"] == {"strategy": "lopa", "k": 2, "block_size": 8}
    assert stats["decode_forwards"] >= 3 and stats["tpf"] == stats["generated_tokens"] / stats["decode_forwards"]
    assert "TPF" in proc.stderr


def test_a_bad_model_arg_is_one_line_and_exit_2(tiny_dream_dir, tmp_path):
    cmd = [sys.executable, "-m", "lopa.eval.lm_eval_adapter", "run", "--model", "lopa",
           "--model_args", f"pretrained={tiny_dream_dir},k=x", "--tasks", "lopa_local",
           "--include_path", str(_local_task(tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: ConfigError: model_args: k='x' must be int"


def test_help_lists_lopas_model_args():
    proc = subprocess.run([sys.executable, "-m", "lopa.eval.lm_eval_adapter", "run", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "pretrained=PATH" in proc.stdout and "branch_confidence" in proc.stdout and "--tasks" in proc.stdout


def test_unknown_model_arg_is_a_clear_error(tiny_dream_dir):
    from lopa.errors import ConfigError
    from lopa.eval.lm_eval_adapter import LopaLM

    with pytest.raises(ConfigError, match="bogus"):
        LopaLM(pretrained=str(tiny_dream_dir), device="cpu", bogus=1)
    lm = LopaLM(pretrained=str(tiny_dream_dir), device="cpu", k="3", tau="0.5", trace="false", steps="None")
    assert lm.decode == {"k": 3, "tau": 0.5, "trace": False, "steps": None}
    with pytest.raises(ConfigError, match="k='x'"):
        LopaLM(pretrained=str(tiny_dream_dir), device="cpu", k="x")


def test_quantize_model_arg(tiny_dream_dir):
    from lopa.eval.lm_eval_adapter import LopaLM
    from lopa.models.quant import Fp8Linear

    lm = LopaLM(pretrained=str(tiny_dream_dir), device="cpu", quantize="fp8")
    assert any(isinstance(m, Fp8Linear) for m in lm.model.loaded.model.modules())
