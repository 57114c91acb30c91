"""ModelConfig: the architecture, read from a Dream (Qwen2-style), LLaDA, SDAR (Qwen3-style) or Fast-dLLM v2
(Qwen2-style) config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsupportedModelError
from .files import read_json_object

# config.json field names per family: our field -> (their field, default or REQUIRED)
REQUIRED = object()
DREAM_FIELDS = {
    "vocab_size": ("vocab_size", REQUIRED),
    "hidden_size": ("hidden_size", REQUIRED),
    "intermediate_size": ("intermediate_size", REQUIRED),
    "num_layers": ("num_hidden_layers", REQUIRED),
    "num_heads": ("num_attention_heads", REQUIRED),
    "num_kv_heads": ("num_key_value_heads", None),
    "rope_theta": ("rope_theta", 1_000_000.0),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "max_position_embeddings": ("max_position_embeddings", 32768),
    "mask_token_id": ("mask_token_id", 151666),
    "eos_token_id": ("eos_token_id", 151643),
    "pad_token_id": ("pad_token_id", None),
    "bos_token_id": ("bos_token_id", None),
    "tie_word_embeddings": ("tie_word_embeddings", False),
}
LLADA_FIELDS = {
    "vocab_size": ("embedding_size", REQUIRED),  # LLaDA pads the embedding past `vocab_size`
    "hidden_size": ("d_model", REQUIRED),
    "intermediate_size": ("mlp_hidden_size", REQUIRED),
    "num_layers": ("n_layers", REQUIRED),
    "num_heads": ("n_heads", REQUIRED),
    "num_kv_heads": ("n_kv_heads", None),
    "rope_theta": ("rope_theta", 500_000.0),
    "rms_norm_eps": ("rms_norm_eps", 1e-5),
    "max_position_embeddings": ("max_sequence_length", 4096),
    "mask_token_id": ("mask_token_id", 126336),
    "eos_token_id": ("eos_token_id", 126081),
    "pad_token_id": ("pad_token_id", None),
    "bos_token_id": ("bos_token_id", None),
    "tie_word_embeddings": ("weight_tying", False),
}
# Block-diffusion families: causal across blocks aligned at position 0, bidirectional inside a block.
# SDAR (JetLM/SDAR-*): Qwen3 tensors (per-head q/k RMSNorm, no bias); some configs omit the two diffusion fields.
SDAR_FIELDS = {**DREAM_FIELDS, "mask_token_id": ("mask_token_id", 151669),
               "block_size": ("block_size", 4), "explicit_head_dim": ("head_dim", None)}
# Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_*): Qwen2.5 tensors; its mask token |<MASK>| (151665) is in
# added_tokens.json, not config.json (the loader reads it from there); the block size is `bd_size`.
FAST_DLLM_FIELDS = {**DREAM_FIELDS, "mask_token_id": ("mask_token_id", 151665),
                    "eos_token_id": ("eos_token_id", 151645), "block_size": ("bd_size", 32)}
FAMILIES = {"dream": DREAM_FIELDS, "llada": LLADA_FIELDS, "sdar": SDAR_FIELDS, "fast_dllm_v2": FAST_DLLM_FIELDS}
# config.json model_type (lower case) -> our family name
MODEL_TYPES = {"dream": "dream", "llada": "llada", "sdar": "sdar", "fast_dllm_qwen": "fast_dllm_v2"}
BLOCK_DIFFUSION = ("sdar", "fast_dllm_v2")
# What each of our fields must hold in config.json, and the smallest allowed value of the numbers.
POSITIVE, NON_NEGATIVE = 1, 0
FIELD_RULES = {
    "vocab_size": (int, POSITIVE), "hidden_size": (int, POSITIVE), "intermediate_size": (int, POSITIVE),
    "num_layers": (int, POSITIVE), "num_heads": (int, POSITIVE), "num_kv_heads": (int, POSITIVE),
    "rope_theta": (float, None), "rms_norm_eps": (float, None), "max_position_embeddings": (int, POSITIVE),
    "mask_token_id": (int, NON_NEGATIVE), "eos_token_id": (int, NON_NEGATIVE), "pad_token_id": (int, NON_NEGATIVE),
    "bos_token_id": (int, NON_NEGATIVE), "tie_word_embeddings": (bool, None), "block_size": (int, POSITIVE),
    "explicit_head_dim": (int, POSITIVE),
}


def _check_field(ours: str, theirs: str, value) -> None:
    """config.json's ``theirs`` (our ``ours``) has the right JSON type and range; CheckpointError naming it if not."""
    kind, least = FIELD_RULES[ours]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if ok and least is not None:
        ok = value >= least
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a positive number"}[kind]
        want += {POSITIVE: " >= 1", NON_NEGATIVE: " >= 0", None: ""}[least]
        raise CheckpointError(f"config.json: field {theirs!r} must be {want}, got {value!r}")
# LLaDA (OLMo-style) switches this implementation does not compute: field -> the only supported value.
LLADA_FIXED = {"scale_logits": False, "input_emb_norm": False, "alibi": False, "rope": True, "include_bias": False,
               "include_qkv_bias": False, "multi_query_attention": None, "block_type": "llama"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "dream" | "llada" | "sdar" | "fast_dllm_v2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    extra_eos_ids: tuple[int, ...] = ()  # e.g. <|im_end|> for chat models, from the tokenizer
    block_size: int | None = None  # block-diffusion models: the block size they were trained with (None: others)
    explicit_head_dim: int | None = None  # config.json's head_dim (Qwen3: SDAR-4B has 128 != hidden / heads)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in ("dream", "fast_dllm_v2")  # Qwen2 has q/k/v biases; LLaMA and Qwen3 have none

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "sdar"  # Qwen3: RMSNorm over each head of q and k, before RoPE

    @property
    def logit_shift(self) -> int:
        # Dream and Fast-dLLM v2 predict position i from the hidden state at i-1; LLaDA and SDAR from i
        return 1 if self.model_type in ("dream", "fast_dllm_v2") else 0

    @property
    def block_diffusion(self) -> bool:
        return self.model_type in BLOCK_DIFFUSION

    def __post_init__(self) -> None:
        if (self.explicit_head_dim is None and self.hidden_size % self.num_heads) or self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: hidden_size {self.hidden_size}, heads {self.num_heads}, kv heads {self.num_kv_heads} "
                "do not divide evenly"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config.json: head dim {self.head_dim} (hidden_size / heads) must be even for RoPE")

    @staticmethod
    def family_of(raw: dict) -> str:
        if not isinstance(raw, dict):
            raise CheckpointError(f"config.json: must hold a JSON object, got {type(raw).__name__}")
        name = str(raw.get("model_type", "")).lower()
        if name in MODEL_TYPES:
            return MODEL_TYPES[name]
        raise UnsupportedModelError(f"config.json: model_type {raw.get('model_type')!r} is not supported "
                                    "(dream, llada, sdar, Fast_dLLM_Qwen)")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        family = cls.family_of(raw)
        if family == "llada":
            for name, supported in LLADA_FIXED.items():
                value = raw.get(name, supported)
                if value != supported and not (value is None and supported is False):  # null reads as off
                    raise UnsupportedModelError(f"config.json: {name}={raw[name]!r} is not supported (only {supported!r})")
        scaling = raw.get("rope_scaling")
        plain = isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
        if family in BLOCK_DIFFUSION and scaling is not None and not plain:
            raise UnsupportedModelError(f"config.json: rope_scaling={scaling!r} is not supported (only null)")
        values: dict = {"model_type": family}
        for ours, (theirs, default) in FAMILIES[family].items():
            value = raw.get(theirs, default)
            if value is REQUIRED:
                raise CheckpointError(f"config.json: required field {theirs!r} is missing")
            if ours == "eos_token_id" and isinstance(value, list):  # several EOS ids: the first is the main one
                if not value:
                    raise CheckpointError(f"config.json: field {theirs!r} is an empty list")
                for item in value:
                    _check_field(ours, theirs, item)
                values["extra_eos_ids"] = tuple(value[1:])
                value = value[0]
            if value is not None:
                _check_field(ours, theirs, value)
            values[ours] = value
        if values["num_kv_heads"] is None:
            values["num_kv_heads"] = values["num_heads"]
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(Path(path)))

    def to_json_dict(self) -> dict:
        """config.json in the family's own format (what Dream / LLaDA / SDAR / Fast-dLLM tooling expects)."""
        qwen = {"hidden_act": "silu", "attention_dropout": 0.0, "rope_scaling": None, "use_sliding_window": False,
                "torch_dtype": "float32"}
        if self.model_type == "dream":
            raw = {"architectures": ["DreamModel"], "model_type": "Dream", **qwen}
        elif self.model_type == "sdar":
            raw = {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "attention_bias": False, **qwen}
        elif self.model_type == "fast_dllm_v2":
            raw = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", **qwen}
        else:
            raw = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
                   "block_type": "llama", "rope": True, "include_bias": False, "vocab_size": self.vocab_size}
        mine = asdict(self)
        for ours, (theirs, _) in FAMILIES[self.model_type].items():
            raw[theirs] = mine[ours]
        if self.model_type == "sdar":
            raw["head_dim"] = self.head_dim
        if self.model_type == "fast_dllm_v2":
            del raw["mask_token_id"]  # Fast-dLLM v2 keeps it in added_tokens.json (|<MASK>|)
        if self.extra_eos_ids:
            raw["eos_token_id"] = [self.eos_token_id, *self.extra_eos_ids]
        return raw
