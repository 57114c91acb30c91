"""SDAR (Qwen3 layout) and Fast-dLLM v2 (Qwen2 layout) folders: loading, typed errors, and logits equal to
transformers' Qwen3ForCausalLM / Qwen2ForCausalLM on the same weights under the block-causal mask (float64),
for a prefill and for a denoising forward over the committed cache."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import DynamicCache

from decoding.hf_block import hf_twin  # tests/decoding: the transformers twin the reference loops use
from lopa.decoding.base import ForwardBatch, PredictSpec
from lopa.errors import CheckpointError, UnsupportedModelError
from lopa.models.config import ModelConfig
from lopa.models.loader import load_folder, save_folder
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import Commit, StepItem

FAMILIES = ("sdar", "fast_dllm_v2")


def _folder(request, family):
    return request.getfixturevalue(f"tiny_{family}_dir")


def test_sdar_reads_qwen3_fields_and_defaults_the_diffusion_ones(tiny_sdar_dir):
    raw = json.loads((tiny_sdar_dir / "config.json").read_text())
    assert raw["model_type"] == "sdar" and raw["architectures"] == ["SDARForCausalLM"]
    cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in ("block_size", "mask_token_id")})
    assert (cfg.block_size, cfg.mask_token_id) == (4, 151669)  # the published defaults when config.json omits them
    assert ModelConfig.from_dict({**raw, "rope_scaling": {"rope_type": "default"}}).rope_theta == raw["rope_theta"]
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.logit_shift == 0
    wide = ModelConfig.from_dict({**raw, "head_dim": 32})  # Qwen3-4B style: head_dim != hidden / heads
    assert wide.head_dim == 32 and wide.hidden_size // wide.num_heads == 16
    names = load_file(str(tiny_sdar_dir / "model.safetensors"))
    assert "model.layers.1.self_attn.q_norm.weight" in names and "lm_head.weight" in names
    assert not any(n.endswith(".bias") for n in names)


def test_fast_dllm_reads_bd_size_and_the_mask_from_added_tokens(tiny_fast_dllm_v2_dir, tmp_path):
    raw = json.loads((tiny_fast_dllm_v2_dir / "config.json").read_text())
    assert raw["model_type"] == "Fast_dLLM_Qwen" and "mask_token_id" not in raw
    loaded = load_folder(tiny_fast_dllm_v2_dir)
    added = json.loads((tiny_fast_dllm_v2_dir / "added_tokens.json").read_text())
    assert loaded.spec.mask_id == added["|<MASK>|"] and loaded.spec.block_size == raw["bd_size"]
    assert loaded.config.qkv_bias and loaded.config.logit_shift == 1
    assert loaded.spec.eos_ids == (loaded.tokenizer.token_id("<|im_end|>"),)
    bad = shutil.copytree(tiny_fast_dllm_v2_dir, tmp_path / "bad")
    (bad / "added_tokens.json").write_text(json.dumps({"|<MASK>|": 3}))
    with pytest.raises(CheckpointError, match="tokenizer gives it"):
        load_folder(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_sharded_and_typed_errors(family, request, tmp_path):
    src = _folder(request, family)
    first = load_folder(src)
    again = save_folder(first.model, src, tmp_path / "again")
    weights = load_file(str(again / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(again / file))
    (again / "model.safetensors").unlink()
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (again / "model.safetensors.index.json").write_text(json.dumps(index))
    second = load_folder(again)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.spec == first.spec and second.tokenizer.chat_template
    raw = json.loads((again / "config.json").read_text())
    (again / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"type": "yarn", "factor": 4.0}}))
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        load_folder(again)
    (again / "config.json").write_text(json.dumps(raw))
    missing = "model.layers.0.self_attn.q_norm.weight" if family == "sdar" else "model.layers.0.self_attn.q_proj.bias"
    part = load_file(str(again / index["weight_map"][missing]))
    save_file({n: t for n, t in part.items() if n != missing}, str(again / index["weight_map"][missing]))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_folder(again)


# float64, except where each stack rounds to float32 on purpose: RMSNorm and the RoPE tables (both), and
# transformers' eager softmax; differences ~1e-7
TOL = dict(atol=2e-6, rtol=1e-5)


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool [Tq, Tk] -> HF's additive 4-D mask [1, 1, Tq, Tk] (float64)."""
    blocked = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return blocked[None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_under_the_block_causal_mask(family, request):
    folder = _folder(request, family)
    loaded = load_folder(folder, dtype=torch.float64)
    hf = hf_twin(loaded, folder)
    bs, shift = loaded.config.block_size, loaded.config.logit_shift
    torch.manual_seed(0)
    P, W = 2 * bs, bs + 3  # prefill: two whole blocks; then a window of one whole block + 3 columns of the next
    tokens = torch.randint(0, loaded.config.vocab_size, (P + W,))
    block = torch.arange(P + W) // bs  # blocks aligned at absolute position 0
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float64)
    runner.reserve(1, 64)
    with torch.no_grad():
        cache = DynamicCache()
        ref = hf(input_ids=tokens[None, :P], attention_mask=additive(block[:P, None] >= block[None, :P]),
                 position_ids=torch.arange(P)[None], past_key_values=cache, use_cache=True).logits[0]
        cols = torch.arange(shift, P)
        got = runner.execute([StepItem(0, ForwardBatch(tokens[None, :P], 0, cols, commit=P, prefill=True,
                                                       block_ids=block[:P]), PredictSpec())])
        h = runner.hidden[0, :P][None]
        torch.testing.assert_close(loaded.model.logits(h, cols)[0], ref[cols - shift], **TOL)
        runner.commit([Commit(0, 0, 0, P)])
        # a denoising forward over the cache: queries P..P+W, keys = cache + window, block-causal
        q, k = block[P:, None], block[None, :]
        ref = hf(input_ids=tokens[None, P:], attention_mask=additive(k <= q), position_ids=torch.arange(P, P + W)[None],
                 past_key_values=cache, use_cache=True).logits[0]
        runner.execute([StepItem(0, ForwardBatch(tokens[None, P:], P, torch.arange(W), block_ids=block[P:]),
                                 PredictSpec())])
        got = loaded.model.logits(runner.hidden[0, :W][None], torch.arange(W), runner.pool.last_hidden[0])[0]
        # column j predicts position P + j: HF's logits at P + j - shift (Fast-dLLM v2's column 0: the cached state)
        expect = ref if not shift else torch.cat([ref_prev(hf, tokens, P, block), ref[:-1]])
        torch.testing.assert_close(got, expect, **TOL)
        # the cache K/V equal transformers' for the committed prefix
        for layer in range(loaded.config.num_layers):
            keys = cache.layers[layer].keys[0] if hasattr(cache, "layers") else cache.key_cache[layer][0]
            torch.testing.assert_close(runner.pool.kv[0, layer, 0, :, :P], keys[:, :P], **TOL)


def ref_prev(hf, tokens, P, block):
    """HF's logits at position P - 1 (the last prefilled position) under the block-causal mask: [1, V]."""
    b = block[:P]
    return hf(input_ids=tokens[None, :P], attention_mask=additive(b[:, None] >= b[None, :]),
              position_ids=torch.arange(P)[None]).logits[0, -1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_lopa_info_shows_block_size_mask_and_stop_ids(family, request):
    from typer.testing import CliRunner

    from lopa.cli import app

    folder = _folder(request, family)
    spec = load_folder(folder).spec
    res = CliRunner().invoke(app, ["info", str(folder)])
    assert res.exit_code == 0, res.output
    assert f"model_type {family}" in res.output and f"block size {spec.block_size}" in res.output
    assert f"mask id {spec.mask_id}" in res.output and f"eos ids {list(spec.eos_ids)}" in res.output


def test_unsupported_block_diffusion_variants_are_typed_errors(tiny_sdar_dir, tmp_path):
    from typer.testing import CliRunner

    from lopa.cli import app

    bad = shutil.copytree(tiny_sdar_dir, tmp_path / "moe")
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "sdar_moe"}))
    with pytest.raises(UnsupportedModelError, match="sdar_moe"):
        load_folder(bad)
    (bad / "config.json").write_text(json.dumps({**raw, "block_size": 0}))
    with pytest.raises(CheckpointError, match="'block_size' must be an integer >= 1"):
        load_folder(bad)
    res = CliRunner().invoke(app, ["info", str(bad)])
    assert res.exit_code == 2 and "block_size" in res.output and "Traceback" not in res.output


def test_demo_runs_the_models_own_loop_beside_lopa(tiny_sdar_dir):
    from typer.testing import CliRunner

    from lopa.cli import app

    res = CliRunner().invoke(app, ["demo", str(tiny_sdar_dir), "--n", "1", "--k", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "| sdar |" in res.output and "| lopa k=2 |" in res.output and "| d2f |" not in res.output
