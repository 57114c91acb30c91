"""Merge a PEFT LoRA adapter (e.g. a D2F adapter) into base checkpoint tensors: W += scale * B @ A."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import AdapterError
from .files import field, read_json_object

PEFT_PREFIX = "base_model.model."


def merge_lora(weights: dict[str, torch.Tensor], adapter_dir: str | Path) -> int:
    """Merge in place into the checkpoint-named ``weights``; returns how many matrices were changed."""
    adapter_dir = Path(adapter_dir)
    cfg_path, tensors_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (cfg_path, tensors_path):
        if not path.is_file():
            raise AdapterError(f"{path}: missing (a PEFT adapter folder needs adapter_config.json and adapter_model.safetensors)")
    cfg = read_json_object(cfg_path, AdapterError)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    r = field(cfg, cfg_path, "r", int, error=AdapterError, required=True)
    alpha = field(cfg, cfg_path, "lora_alpha", (int, float), default=r, error=AdapterError)
    rslora = field(cfg, cfg_path, "use_rslora", bool, default=False, error=AdapterError)
    if r < 1:
        raise AdapterError(f"{cfg_path}: field 'r' must be >= 1, got {r}")
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    try:
        tensors = load_file(str(tensors_path))
    except Exception as err:
        raise AdapterError(f"{tensors_path}: unreadable ({err})") from None
    merged = 0
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in tensors:
            raise AdapterError(f"{tensors_path}: {name} has no matching lora_B tensor")
        target = module + ".weight"
        if target not in weights:
            raise AdapterError(f"adapter targets {target}, which the base model does not have (adapter for another base?)")
        w, b = weights[target], tensors[b_name]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
            raise AdapterError(
                f"adapter for {target}: B{tuple(b.shape)} @ A{tuple(a.shape)} does not fit the base weight {tuple(w.shape)}"
            )
        weights[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        merged += 1
    if merged == 0:
        raise AdapterError(f"{tensors_path}: no LoRA tensors found")
    return merged
