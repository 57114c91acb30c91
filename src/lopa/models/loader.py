"""HF model folder -> our Transformer, tokenizer and ModelSpec; and back (save_folder)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .spec import ModelSpec
from ..errors import CheckpointError
from .config import ModelConfig
from .files import field, read_json_object
from .lora import merge_lora
from .names import IGNORED_SUFFIXES, parameter_sources
from .tokenizer import Tokenizer
from .transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json")
FAST_DLLM_MASK = "|<MASK>|"  # Fast-dLLM v2's mask token, declared in added_tokens.json
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>")  # Dream/Qwen and LLaDA chat turns end with these


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    spec: ModelSpec


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's single or sharded safetensors checkpoint, by checkpoint name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = field(read_json_object(index), index, "weight_map", dict, required=True)
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if bad:
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names, got {bad[0]!r}")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors file ({err})") from None
    return weights


def _state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    sources = parameter_sources(cfg.model_type, cfg.num_layers, cfg.qkv_bias, cfg.tie_word_embeddings)
    expected = model.state_dict()
    state, used = {}, set()
    for ours, theirs in sources.items():
        missing = [name for name in theirs if name not in weights]
        if missing:
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}")
        tensor = torch.cat([weights[name] for name in theirs], dim=0) if len(theirs) > 1 else weights[theirs[0]]
        if tensor.shape != expected[ours].shape:
            parts = ", ".join(f"{n} {tuple(weights[n].shape)}" for n in theirs)
            raise CheckpointError(
                f"tensor shape mismatch: {parts} does not fit {ours} {tuple(expected[ours].shape)} of config.json"
            )
        state[ours] = tensor
        used.update(theirs)
    extra = [n for n in weights if n not in used and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}: wrong model_type?")
    return state


def model_spec(cfg: ModelConfig, tokenizer: Tokenizer) -> ModelSpec:
    eos = [cfg.eos_token_id, *cfg.extra_eos_ids]
    eos += [i for t in CHAT_END_TOKENS if (i := tokenizer.token_id(t)) is not None]
    return ModelSpec(cfg.mask_token_id, tuple(dict.fromkeys(eos)), cfg.max_position_embeddings, cfg.vocab_size,
                     cfg.block_size)


def fast_dllm_mask_id(folder: Path, tokenizer: Tokenizer) -> int:
    """Fast-dLLM v2's mask id: |<MASK>| in added_tokens.json (else in the tokenizer); CheckpointError if neither."""
    path = folder / "added_tokens.json"
    declared = field(read_json_object(path), path, FAST_DLLM_MASK, int) if path.is_file() else None
    known = tokenizer.token_id(FAST_DLLM_MASK)
    if declared is not None and known is not None and declared != known:
        raise CheckpointError(f"{path}: {FAST_DLLM_MASK} has id {declared} but the tokenizer gives it {known}")
    if declared is None and known is None:
        raise CheckpointError(f"{folder}: no {FAST_DLLM_MASK} token in added_tokens.json or the tokenizer "
                              "(Fast-dLLM v2 needs its mask token)")
    return declared if declared is not None else known


def load_folder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                adapter: str | Path | None = None) -> LoadedModel:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    cfg = ModelConfig.from_file(folder / "config.json")
    tokenizer = Tokenizer(folder)
    if cfg.model_type == "fast_dllm_v2":
        cfg = dataclasses.replace(cfg, mask_token_id=fast_dllm_mask_id(folder, tokenizer))
    weights = read_weights(folder)
    if adapter is not None:
        merge_lora(weights, adapter)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = _state_dict(cfg, weights, model)
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    if cfg.mask_token_id >= cfg.vocab_size:
        raise CheckpointError(f"config.json: mask_token_id {cfg.mask_token_id} is outside the vocabulary ({cfg.vocab_size})")
    return LoadedModel(model, tokenizer, cfg, model_spec(cfg, tokenizer))


def save_folder(model: Transformer, tokenizer_dir: str | Path, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a folder in the family's own layout: config.json, model.safetensors (split names), tokenizer files."""
    cfg: ModelConfig = model.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    raw = cfg.to_json_dict()
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if cfg.model_type == "dream":  # Dream's own loader (DreamModel.from_pretrained) requires this file
        generation = {"mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                      "bos_token_id": raw.get("bos_token_id"), "alg": "origin",
                      "steps": 512, "max_length": cfg.max_position_embeddings}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    sizes = {"attn.qkv": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim],
             "mlp.gate_up": [cfg.intermediate_size, cfg.intermediate_size]}
    tensors = {}
    for ours, theirs in parameter_sources(cfg.model_type, cfg.num_layers, cfg.qkv_bias, cfg.tie_word_embeddings).items():
        if len(theirs) == 1:
            tensors[theirs[0]] = state[ours].contiguous()
            continue
        split = sizes[ours.split(".", 2)[2].rsplit(".", 1)[0]]
        for name, part in zip(theirs, state[ours].split(split, dim=0)):
            tensors[name] = part.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    src = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copy(src / name, out / name)
    return out
