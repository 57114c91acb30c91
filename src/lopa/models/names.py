"""Checkpoint tensor names per family, declared as data.

Each entry maps one of our parameters to the checkpoint tensors it is made of; several names are
concatenated along dim 0 (fused q/k/v and gate/up projections). ``{i}`` is the layer index.
"""

from __future__ import annotations

DREAM = {
    "globals": {
        "embed.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
        "lm_head.weight": ["lm_head.weight"],
    },
    "layer": {
        "attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        "attn.qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
        "attn.o.weight": ["self_attn.o_proj.weight"],
        "mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "mlp.down.weight": ["mlp.down_proj.weight"],
        "attn_norm.weight": ["input_layernorm.weight"],
        "mlp_norm.weight": ["post_attention_layernorm.weight"],
    },
    "layer_prefix": "model.layers.{i}.",
}

# LLaDA's LLaMA block: ff_proj is the gate (activated), up_proj the up projection, ff_out the down projection.
LLADA = {
    "globals": {
        "embed.weight": ["model.transformer.wte.weight"],
        "norm.weight": ["model.transformer.ln_f.weight"],
        "lm_head.weight": ["model.transformer.ff_out.weight"],
    },
    "layer": {
        "attn.qkv.weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
        "attn.o.weight": ["attn_out.weight"],
        "mlp.gate_up.weight": ["ff_proj.weight", "up_proj.weight"],
        "mlp.down.weight": ["ff_out.weight"],
        "attn_norm.weight": ["attn_norm.weight"],
        "mlp_norm.weight": ["ff_norm.weight"],
    },
    "layer_prefix": "model.transformer.blocks.{i}.",
}

# SDAR: Qwen3's names, with a per-head RMSNorm of q and k (no q/k/v bias: filtered by has_bias).
QWEN3 = {**DREAM, "layer": {**DREAM["layer"], "attn.q_norm.weight": ["self_attn.q_norm.weight"],
                            "attn.k_norm.weight": ["self_attn.k_norm.weight"]}}

FAMILY_NAMES = {"dream": DREAM, "llada": LLADA, "sdar": QWEN3, "fast_dllm_v2": DREAM}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters save; recomputed here


def parameter_sources(model_type: str, num_layers: int, has_bias: bool, tied: bool) -> dict[str, list[str]]:
    """Our parameter name -> checkpoint names, for every parameter of a model of this shape."""
    table = FAMILY_NAMES[model_type]
    out = {ours: list(theirs) for ours, theirs in table["globals"].items()}
    if tied:
        out.pop("lm_head.weight")
    for i in range(num_layers):
        prefix = table["layer_prefix"].format(i=i)
        for ours, theirs in table["layer"].items():
            if ours.endswith(".bias") and not has_bias:
                continue
            out[f"layers.{i}.{ours}"] = [prefix + name for name in theirs]
    return out
