"""One declaration of the per-request settings (DecodeConfig's fields): every front end takes each field it is
declared for, under the field's name, and says why it does not take the others; docs/settings.md is current."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import lopa
from lopa import api, prompts_file
from lopa.cli import app
from lopa.config import FRONT_ENDS, DecodeConfig, hidden_settings, settings
from lopa.errors import ConfigError
from lopa.serve import protocol

# A valid value other than the default for every field (each set alone, every other field at its default).
SAMPLE = {"strategy": "d2f", "gen_length": 40, "block_size": 8, "tau": 0.7, "add_threshold": 0.3,
          "complete_threshold": 0.8, "k": 3, "base": "threshold", "temperature": 0.5, "top_p": 0.9, "seed": 11,
          "confidence": "margin", "branch_confidence": "top_m", "branch_m": 3, "k_policy": "text",
          "attention": "full", "steps": 20, "alg": "origin", "max_rounds": 50, "trace": True, "compat": "published",
          "sub_block": 4, "fold_commit": False, "score_span": "active", "verify_lookahead": False}
FIELDS = [f.name for f in dataclasses.fields(DecodeConfig)]
runner = CliRunner()


def test_the_sample_covers_every_field_and_every_field_is_valid_alone():
    assert set(SAMPLE) == set(FIELDS), "a new DecodeConfig field needs a sample value here"
    for name, value in SAMPLE.items():
        assert getattr(DecodeConfig(**{name: value}), name) == value != getattr(DecodeConfig(), name)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_field_is_taken_or_says_why_not(front_end):
    taken = {f.name for f in settings(front_end)}
    hidden = hidden_settings(front_end)
    assert taken | set(hidden) == set(FIELDS) and not taken & set(hidden)
    assert all(len(reason) > 10 for reason in hidden.values())


class Captured(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """load_model returns a stand-in; api.generate records its keyword arguments instead of decoding."""
    seen = {}

    def fake_generate(model, prompt, **kwargs):
        seen.update(kwargs)
        raise ConfigError("captured")

    monkeypatch.setattr(api, "load_model", lambda *a, **k: SimpleNamespace(model_type="dream", close=lambda: None))
    monkeypatch.setattr(api, "generate", fake_generate)
    return seen


def _flag(name):
    return "--" + name.replace("_", "-")


def _args(name, lists: bool = False) -> list[str]:
    """The flag setting SAMPLE[name]: --name VALUE, or for a bool field --name / --no-name (`lopa eval`'s sweep
    fields, ``lists``: --name true|false)."""
    value = SAMPLE[name]
    if lists and DecodeConfig.__dataclass_fields__[name].metadata["sweep"]:
        return [_flag(name), str(value).lower()]
    if isinstance(value, bool):
        return [_flag(name) if value else "--no-" + name.replace("_", "-")]
    return [_flag(name), str(value)]


@pytest.mark.parametrize("name", [f.name for f in settings("generate")])
def test_lopa_generate_takes_the_field(no_model, name):
    res = runner.invoke(app, ["generate", "-p", "hi", *_args(name)])
    assert "captured" in res.stderr, res.output
    assert no_model[name] == SAMPLE[name]


@pytest.mark.parametrize("name", [f.name for f in settings("eval")])
def test_lopa_eval_takes_the_field(no_model, monkeypatch, tmp_path, name):
    from lopa.eval import harness

    runs = {}

    def fake_run_eval(model, problems, configs, **_):
        runs.update(configs)
        raise ConfigError("captured")

    monkeypatch.setattr(harness, "run_eval", fake_run_eval)
    res = runner.invoke(app, ["eval", "--n", "1", "--strategies", "lopa", "--out", str(tmp_path),
                                       *_args(name, lists=True)])
    assert "captured" in res.stderr, res.output
    (cfg,) = runs.values()
    assert getattr(cfg, name) == SAMPLE[name]


@pytest.mark.parametrize("name", [f.name for f in settings("server")])
def test_the_server_takes_the_field(name):
    req = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", name: SAMPLE[name]})
    cfg = protocol.decode_settings(req, "dream", n_prompt=2, context=512)
    assert getattr(cfg, name) == SAMPLE[name]


def test_the_server_refuses_the_hidden_fields_and_maps_max_tokens():
    for name in hidden_settings("server"):
        with pytest.raises(Exception, match=name):
            protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", name: SAMPLE[name]})
    req = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 40})
    assert protocol.decode_settings(req, "dream", 2, 512).gen_length == 40


@pytest.mark.parametrize("name", [f.name for f in settings("prompts_file")])
def test_the_prompts_file_takes_the_field(tmp_path, name):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", name: SAMPLE[name]}) + "\n")
    entries = prompts_file.read_prompts(path)
    (cfg,) = prompts_file.configs(entries, path, None, "dream", {})
    assert getattr(cfg, name) == SAMPLE[name]


def test_k_policy_load_needs_the_engines_step_rows_at_every_front_end(no_model, tmp_path):
    """Never silently 'fixed': refused at admission without RunnerConfig.step_rows, taken with it."""
    from lopa.request import check_config

    load = DecodeConfig(k_policy="load")
    with pytest.raises(ConfigError, match="step_rows"):
        check_config(load, model_type="dream", step_rows=None)
    assert check_config(load, model_type="dream", step_rows=64) is load
    req = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", "k_policy": "load"})
    with pytest.raises(ConfigError, match="step_rows"):
        protocol.decode_settings(req, "dream", 2, 512, step_rows=None)
    assert protocol.decode_settings(req, "dream", 2, 512, step_rows=64).k_policy == "load"
    res = runner.invoke(app, ["eval", "--n", "1", "--strategies", "lopa", "--k-policy", "load",
                                       "--out", str(tmp_path)])
    assert res.exit_code == 2 and "step_rows" in res.stderr


def test_k_policy_load_through_the_api(tiny_dream_dir):
    plain = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    with pytest.raises(ConfigError, match="step_rows"):
        lopa.generate(plain, "hi", k_policy="load", gen_length=8, block_size=8)
    budget = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", step_rows=16))
    assert lopa.generate(budget, "hi", k_policy="load", k=3, gen_length=8, block_size=8).stats.decode_forwards >= 1


def test_docs_settings_table_is_current():
    from lopa.settings_doc import settings_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert path.read_text() == settings_markdown(), "regenerate: python -m lopa.settings_doc > docs/settings.md"


def test_the_help_of_a_choice_names_every_choice():
    """The declarations are written before the registries they name can be imported: keep them in step."""
    from lopa.decoding.budget import BUDGETS
    from lopa.decoding.confidence import BRANCH_SCORES

    fields = {f.name: f for f in dataclasses.fields(DecodeConfig)}
    for field, names in (("branch_confidence", BRANCH_SCORES), ("k_policy", BUDGETS)):
        for name in names:
            assert name in fields[field].metadata["help"], (field, name)
