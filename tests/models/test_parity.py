"""Our Dream / LLaDA stacks equal transformers' Qwen2 / Llama on the same weights (bidirectional mask), and
the branch-batched cached path equals the uncached path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lopa.decoding.base import ForwardBatch, PredictSpec
from lopa.models.attention import block_causal_mask
from lopa.models.loader import load_folder
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import Commit, StepItem


def _hf_twin(cfg, model_type):
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                  attn_implementation="eager")
    if model_type == "dream":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(attention_bias=False, mlp_bias=False, **common)).eval()


def _copy_weights(ours, hf):
    cfg = ours.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attn.qkv.weight.split([q, kv, kv])
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.attn.o.weight,
                   p + "input_layernorm.weight": layer.attn_norm.weight,
                   p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
                   p + "mlp.down_proj.weight": layer.mlp.down.weight})
        gate, up = layer.mlp.gate_up.weight.chunk(2)
        sd.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
        if layer.attn.qkv.bias is not None:
            bq, bk, bv = layer.attn.qkv.bias.split([q, kv, kv])
            sd.update({p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk, p + "self_attn.v_proj.bias": bv})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_matches_transformers_with_bidirectional_mask(family, request):
    loaded = load_folder(request.getfixturevalue(f"tiny_{family}_dir"))
    ours = loaded.model
    hf = _hf_twin(loaded.config, family)
    _copy_weights(ours, hf)
    torch.manual_seed(0)
    tokens = torch.randint(0, loaded.config.vocab_size, (2, 17))
    bidirectional = torch.zeros(2, 1, 17, 17)  # additive 4-D mask of zeros: every position sees every position
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=bidirectional).logits  # [B, T, V]
        shift = loaded.config.logit_shift  # Dream: our column j is HF's logits at j-1
        got = ours.logits(ours(tokens), torch.arange(shift, 17))
    torch.testing.assert_close(got, ref[:, : 17 - shift], atol=2e-5, rtol=1e-4)


def _prefilled_runner(loaded, prefix):
    """A one-slot runner whose slot holds ``prefix`` committed (the prompt prefill, as the engine runs it)."""
    runner = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32)
    runner.reserve(1, 128)
    P = len(prefix)
    runner.execute([StepItem(0, ForwardBatch(prefix[None], 0, torch.empty(0, dtype=torch.long), commit=P, prefill=True),
                             PredictSpec())])
    runner.commit([Commit(0, 0, 0, P)])
    return runner


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("block_causal", [False, True])
def test_branch_batched_cache_equals_uncached(family, block_causal, request):
    """K branches over one committed prefix give each branch's uncached logits (exact under block-causal
    attention; under full attention the prefix was computed without the window, so we compare to that)."""
    loaded = load_folder(request.getfixturevalue(f"tiny_{family}_dir"))
    model, cfg = loaded.model, loaded.config
    torch.manual_seed(1)
    P, W, K = 11, 8, 3
    prefix = torch.randint(0, cfg.vocab_size, (P,))
    branches = torch.randint(0, cfg.vocab_size, (K, W))
    block_ids = torch.tensor([0] * 3 + [1] * 5) if block_causal else None
    with torch.no_grad():
        runner = _prefilled_runner(loaded, prefix)
        runner.execute([StepItem(0, ForwardBatch(branches, P, torch.arange(W), block_ids=block_ids), PredictSpec())])
        hidden = runner.hidden[0].view(K, W, -1)
        got = model.logits(hidden, torch.arange(W), runner.pool.last_hidden[0])
        for r in range(K):
            seq = torch.cat([prefix, branches[r]])[None]
            ids = torch.cat([torch.zeros(P, dtype=torch.long), 1 + (block_ids if block_causal else torch.zeros(W, dtype=torch.long))])
            ref_hidden = model(seq, attn_mask=block_causal_mask(ids))  # prefix sees only itself, as when it was cached
            ref = model.logits(ref_hidden, torch.arange(P, P + W))
            torch.testing.assert_close(got[r], ref[0], atol=2e-5, rtol=1e-4)


def test_commit_of_a_later_branch_moves_its_kv(tiny_dream_dir):
    loaded = load_folder(tiny_dream_dir)
    cfg = loaded.config
    torch.manual_seed(2)
    P, W, K, n = 6, 5, 3, 4
    prefix = torch.randint(0, cfg.vocab_size, (P,))
    branches = torch.randint(0, cfg.vocab_size, (K, W))
    with torch.no_grad():
        runner = _prefilled_runner(loaded, prefix)
        batch = ForwardBatch(branches, P, torch.arange(W), commit=n, block_ids=torch.tensor([0] * n + [1]))
        runner.execute([StepItem(0, batch, PredictSpec())])
        kv = runner.pool.kv
        expected = kv[:, :, 0, :, P + 2 * W: P + 2 * W + n].clone()
        winner_hidden = runner.hidden[0, 2 * W + n - 1].clone()
        runner.commit([Commit(0, 0, 2, n)])
    assert runner.pool.lengths[0] == P + n
    torch.testing.assert_close(kv[:, :, 0, :, P:P + n], expected)
    torch.testing.assert_close(runner.pool.last_hidden[0], winner_hidden)


def test_dream_column_zero_needs_the_committed_hidden_state(tiny_dream_dir):
    model = load_folder(tiny_dream_dir).model
    hidden = model(torch.randint(0, 100, (1, 5)))
    with pytest.raises(ValueError, match="last committed hidden state"):
        model.logits(hidden, torch.arange(5))
    assert model.logits(hidden, torch.arange(1, 5)).isfinite().all()
