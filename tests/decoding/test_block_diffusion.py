"""SDAR and Fast-dLLM v2 decoding on the engine, token for token against reference loops over transformers
(tests/decoding/hf_block.py), float64 on the CPU: prompts shorter than a block, on a block boundary and past
it, EOS inside a block; the folded commit against the extra-forward loop (tokens and committed K/V);
LoPA k = 0 against the model's own loop; batched against alone."""

import math

import pytest
import torch

from lopa import RunnerConfig, generate, generate_many, load_model
from lopa.config import DecodeConfig
from lopa.errors import ConfigError
from lopa.models.tiny import write_tiny_checkpoint

from .hf_block import fast_dllm_v2_reference, hf_twin, sdar_reference

PROMPTS = ([7, 9, 11], list(range(5, 13)), list(range(6, 15)), list(range(20, 31)))  # 3, 8, 9, 11 tokens
GEN = 18
# tiny models whose predictions are peaked enough to fill several masks a step and that end in EOS often
TINY = {"sdar": dict(seed=5, logit_scale=0.8, special_scale=5.0),
        "fast_dllm_v2": dict(seed=5, logit_scale=0.6, special_scale=2.5)}


@pytest.fixture(scope="module", params=["sdar", "fast_dllm_v2"])
def family(request, tmp_path_factory):
    name = request.param
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(name), model_type=name, **TINY[name])
    model = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64"))
    return name, model, hf_twin(model.loaded, folder)


def reference(name, model, hf, prompt, tau):
    spec, size = model.loaded.spec, model.loaded.spec.block_size
    if name == "sdar":
        return sdar_reference(hf, spec, prompt, GEN, size, tau)
    return fast_dllm_v2_reference(hf, spec, prompt, GEN, size, 4, tau)


OPTIONS = dict(score_span="next_region", verify_lookahead=True)  # LoPA's options over these loops, both on
PAPER = dict(score_span="active", verify_lookahead=False)  # both off: Eq. 2 over the active region, as the paper


def own(name, **kw):
    return dict(strategy=name, gen_length=GEN, sub_block=4, **kw)  # sub-blocks of 4 in the tiny v2's blocks of 8


def test_matches_the_reference_loop(family):
    name, model, hf = family
    size = model.loaded.spec.block_size
    eos_mid_block, multi = False, False
    for tau in (1.0, 0.9, 0.4):  # 1.0: one token a step (SDAR's fixed steps); else the dynamic threshold
        for prompt in PROMPTS:
            ref = reference(name, model, hf, prompt, tau)
            got = generate(model, prompt, **own(name, tau=tau), trace=True)
            assert got.token_ids == ref.answer(), (prompt, tau)
            # SDAR's reference caches each block by one more forward, folded here; Fast-dLLM v2's is needed anyway
            assert got.stats.decode_forwards == ref.forwards - (ref.stores if name == "sdar" else 0), (prompt, tau)
            eos = ref.eos_at()
            eos_mid_block |= eos is not None and eos % size != size - 1 and eos + 1 < ref.T
            multi |= any(len(s.filled) > 1 for s in got.trace)
            if tau == 1.0:
                assert all(len(s.filled) == 1 for s in got.trace)
    assert eos_mid_block and multi  # the cases exercised what they claim to


@pytest.mark.parametrize("branching", [dict(k=0), dict(k=3, **PAPER), dict(k=3, **OPTIONS)],
                         ids=["k0", "k3", "k3-options"])
@pytest.mark.parametrize("name", ["sdar", "fast_dllm_v2"])
def test_folded_commit_equals_the_extra_forward_loop(name, branching, request, monkeypatch):
    """Same tokens and the same committed K/V; SDAR saves one forward per block finished before the last."""
    model = load_model(request.getfixturevalue(f"tiny_{name}_dir"), runner=RunnerConfig(device="cpu", dtype="float64"))
    monkeypatch.setattr(model.runner, "shrink", lambda: None)  # keep the idle engine's pool: its K/V are compared
    size = model.loaded.spec.block_size
    for prompt in PROMPTS[1:3]:  # on a block boundary and past it
        runs = []
        for fold in (True, False):
            cfg = DecodeConfig(**own("lopa", base=name, tau=0.9, fold_commit=fold, block_size=size, **branching))
            seq = model.engine.prepare(prompt, cfg)
            with torch.inference_mode():
                (out,) = model.engine.generate([seq])
            runs.append((out.token_ids, out.stats.decode_forwards, seq.state.cached,
                         model.runner.pool.kv[:, :, 0, :, :seq.state.cached].clone()))
        (tok_a, fwd_a, n_a, kv_a), (tok_b, fwd_b, n_b, kv_b) = runs
        assert tok_a == tok_b and len(tok_a) == GEN
        n = min(n_a, n_b)
        assert n >= len(prompt) + size and torch.equal(kv_a[..., :n, :], kv_b[..., :n, :])
        if name == "sdar":
            assert fwd_b - fwd_a == (n_b - len(prompt) // size * size) // size
        else:  # Fast-dLLM v2's forward over a finished block gives the next block's first token: nothing to save
            assert fwd_a == fwd_b


def test_lopa_k0_is_the_models_own_loop_and_lopa_verifies_branches(family):
    name, model, _ = family
    for prompt in PROMPTS:
        base = generate(model, prompt, **own(name, tau=0.9), trace=True)
        for options in (PAPER, OPTIONS):
            k0 = generate(model, prompt, **own("lopa", tau=0.9, base=name, k=0, **options), trace=True)
            assert k0.token_ids == base.token_ids and [s.filled for s in k0.trace] == [s.filled for s in base.trace]
    lopa = generate(model, PROMPTS[3], **own("lopa", tau=0.9, base=name, k=3), trace=True)
    assert lopa.stats.branch_rows > lopa.stats.decode_forwards  # several branches verified in one forward


def test_batched_equals_alone(family):
    name, model, _ = family
    for kw in (own(name, tau=0.4), own("lopa", tau=0.9, base=name, k=3, **PAPER),
               own("lopa", tau=0.9, base=name, k=3, **OPTIONS)):
        alone = [generate(model, p, **kw).token_ids for p in PROMPTS]
        together = generate_many(model, list(PROMPTS), **kw)
        assert [r.token_ids for r in together] == alone
    assert model.engine.counters.requests_per_step > 1


def test_branch_options_on_a_model(family):
    """score_span "next_region": no winner scores +inf (an empty set) but in the last block, where there is no
    next region; verify_lookahead: some lookahead is vetoed (-inf), never the anchor, never the winner."""
    name, model, _ = family
    steps = {"active": [], "next_region": [], "verify": []}  # (the last block's start, a branched step)
    for prompt in PROMPTS:
        last = (len(prompt) + GEN - 1) // model.loaded.spec.block_size * model.loaded.spec.block_size
        for label, options in (("active", PAPER), ("next_region", dict(PAPER, score_span="next_region")),
                               ("verify", dict(PAPER, verify_lookahead=True))):
            out = generate(model, prompt, **own("lopa", tau=0.9, base=name, k=3, **options), trace=True)
            steps[label] += [(last, s) for s in out.trace if s.scores]
    empty_before_last = lambda last, s: s.scores[s.winner] == math.inf and min(s.filled) < last  # noqa: E731
    assert any(empty_before_last(*x) for x in steps["active"])  # the case the option is for
    assert not any(empty_before_last(*x) for x in steps["next_region"])
    vetoed = [s for _, s in steps["verify"] if -math.inf in s.scores]
    assert vetoed and all(s.scores[0] > -math.inf and s.scores[s.winner] > -math.inf for s in vetoed)


def test_next_region_under_branch_parallel(tiny_sdar_dir, tiny_fast_dllm_v2_dir):
    """2 gloo ranks = one process with both options on. A forward after a reused next-block fill branches while
    it commits the finished block, so here K/V do travel (Commit-Winner-Cache), equal on every rank."""
    for name, folder in (("sdar", tiny_sdar_dir), ("fast_dllm_v2", tiny_fast_dllm_v2_dir)):
        ref = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64"))
        bp = load_model(folder, runner=RunnerConfig(device="cpu", dtype="float64", branch_parallel=2, bp_check=True,
                                                    bp_timeout_s=60))
        try:
            kw = own("lopa", base=name, k=3, tau=0.9, **OPTIONS)
            for prompt in PROMPTS:
                a, b = generate(ref, prompt, **kw), generate(bp, prompt, **kw)
                assert b.token_ids == a.token_ids and b.stats.decode_forwards == a.stats.decode_forwards
            assert bp.engine.bp.broadcasts > 0 and bp.engine.bp.kv_max_diff == 0.0
        finally:
            bp.close()


def test_defaults_presets_and_errors(family):
    name, model, _ = family
    default = generate(model, PROMPTS[0], gen_length=8)
    assert default.config.block_size == model.loaded.spec.block_size  # the model's own block size
    assert default.config.strategy == "lopa" and default.config.base == name
    with pytest.raises(ConfigError, match="trained with blocks of"):
        generate(model, PROMPTS[0], strategy=name, gen_length=8, block_size=model.loaded.spec.block_size * 2)
    with pytest.raises(ConfigError, match="block-causal"):
        DecodeConfig(strategy=name, attention="full")
    with pytest.raises(ConfigError, match="sub_block"):
        DecodeConfig(strategy="fast_dllm_v2", block_size=32, sub_block=5)
