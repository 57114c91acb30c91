"""compat="published" against fixtures recorded from the published LoPA code (tools/published_fixtures.py).

Every recorded run must come out identical: generated ids, the step count the published code reports, and
per round the number of branches and the winner. The checkpoints are rebuilt here from their recorded
arguments; their hashes guard against a silent change in the tiny-checkpoint writer.
"""

import hashlib
import json
from pathlib import Path

import pytest

import lopa
from lopa.config import decode_config
from lopa.errors import ConfigError, PromptTooLongError
from lopa.models.tiny import write_tiny_checkpoint

FIXTURE = Path(__file__).parent.parent / "fixtures" / "published_lopa.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def models(recorded, tmp_path_factory):
    out = []
    for ckpt in recorded["checkpoints"]:
        path = write_tiny_checkpoint(tmp_path_factory.mktemp(f"published{ckpt['index']}"), **ckpt["args"])
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert digest == ckpt["sha256"], "lopa.models.tiny changed: re-record with tools/published_fixtures.py"
        out.append(lopa.load_model(path, runner=lopa.RunnerConfig(device="cpu", dtype=recorded["meta"]["dtype"])))
    return out


def published_config(setting: dict, cap: int):
    return decode_config(None, "dream", compat="published", k=setting["k"], tau=setting["tau"],
                         add_threshold=setting["add_threshold"], complete_threshold=setting["complete_threshold"],
                         block_size=setting["block_size"], gen_length=setting["gen_length"], max_rounds=cap, trace=True)


def test_fixture_grid_covers_what_the_issue_asks(recorded):
    runs = recorded["runs"]
    settings = {json.dumps(r["setting"], sort_keys=True) for r in runs}
    assert {r["setting"]["block_size"] for r in runs} == {8, 16}
    assert {r["setting"]["gen_length"] for r in runs} == {32, 64}
    assert {r["setting"]["k"] for r in runs} == {0, 2, 3, 7}
    assert len({(r["setting"]["tau"], r["setting"]["add_threshold"]) for r in runs}) >= 4
    assert len(settings) == 80 and len({tuple(r["prompt"]) for r in runs}) >= 4
    assert recorded["meta"]["commit"] == "433177a608dee8901bae0e7c02f9b6f341a6f6d0"
    # the quirks are exercised: EOS written, runs that never end, lookaheads winning and losing
    eos = {c["index"]: c["eos_id"] for c in recorded["checkpoints"]}
    assert any(r["terminated"] and eos[r["checkpoint"]] in r["output"] for r in runs)
    assert any(not r["terminated"] for r in runs)
    last = [(w, n) for r in runs for w, n in zip(r["winners"], r["forwards"]) if n > 1]
    assert any(w == n - 1 for w, n in last) and any(w < n - 1 for w, n in last)


def test_published_mode_reproduces_every_recorded_run(recorded, models):
    cap = recorded["meta"]["cap"]
    wrong = []
    for i, run in enumerate(recorded["runs"]):
        result = lopa.generate(models[run["checkpoint"]], run["prompt"], published_config(run["setting"], cap))
        got = {"terminated": not result.stats.hit_round_cap,
               "winners": [s.winner for s in result.trace],
               "forwards": [len(s.scores) for s in result.trace]}
        want = {k: run[k] for k in got}
        if run["terminated"]:
            got.update(output=result.token_ids, steps=result.stats.decode_forwards + 1)
            want.update(output=run["output"], steps=run["steps"])
        else:  # stopped at the cap: the base branch's filled prefix at that point
            at_cap = run["at_cap"][len(run["prompt"]):]
            mask = models[run["checkpoint"]].loaded.spec.mask_id
            got["at_cap"] = result.token_ids
            want["at_cap"] = at_cap[: at_cap.index(mask)] if mask in at_cap else at_cap
        if got != want:
            wrong.append((i, run["setting"], {k: (got[k], want[k]) for k in got if got[k] != want[k]}))
    assert not wrong, f"{len(wrong)} of {len(recorded['runs'])} runs differ; first: {wrong[:2]}"


def test_published_mode_counts_tokens_up_to_eos_and_reports_non_termination(recorded, models):
    runs = recorded["runs"]
    eos_run = next(r for r in runs if r["terminated"] and recorded["checkpoints"][r["checkpoint"]]["eos_id"] in r["output"])
    result = lopa.generate(models[eos_run["checkpoint"]], eos_run["prompt"], published_config(eos_run["setting"], 200))
    eos = recorded["checkpoints"][eos_run["checkpoint"]]["eos_id"]
    assert result.token_ids == eos_run["output"]  # the published output: every generated block
    assert result.stats.generated_tokens == result.token_ids.index(eos) + 1  # lopa's count: up to the first EOS
    stuck = next(r for r in runs if not r["terminated"])
    capped = lopa.generate(models[stuck["checkpoint"]], stuck["prompt"], published_config(stuck["setting"], 30))
    assert capped.stats.hit_round_cap and capped.stats.decode_forwards == 30


def test_published_mode_rejects_what_the_published_loop_cannot_do(tiny_dream_dir, tiny_llada_dir):
    with pytest.raises(ConfigError, match="strategy must be 'lopa'"):
        decode_config(None, compat="published", strategy="d2f")
    with pytest.raises(ConfigError, match="exactly one lookahead"):
        decode_config(None, compat="published", k=1)
    with pytest.raises(ConfigError, match="greedy"):
        decode_config(None, compat="published", temperature=0.5)
    with pytest.raises(ConfigError, match="compat"):
        decode_config(None, compat="paper")
    assert decode_config(None, compat="published").confidence == "neg_entropy"
    assert decode_config(None, compat="published", confidence="prob").confidence == "prob"
    dream = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    with pytest.raises(PromptTooLongError, match="exceed the context"):  # 500 + 2 blocks of 8 > 512 positions
        lopa.generate(dream, [5] * 500, compat="published", gen_length=16, block_size=8)
    llada = lopa.load_model(tiny_llada_dir, runner=lopa.RunnerConfig(device="cpu"))
    with pytest.raises(ConfigError, match="published Dream code"):
        lopa.generate(llada, [5, 6, 7], compat="published", gen_length=16, block_size=8)
