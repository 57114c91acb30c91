"""Weight-only int8: Linear layers of the decoder stack keep int8 weights with one scale per output channel
(symmetric, round to nearest); activations stay in the model's dtype and the weight is dequantized per call.
This halves (bf16) or quarters (fp32) the weight memory; it is not a faster kernel. The embeddings, norms and
lm_head stay in full precision. Chosen by RunnerConfig.quantize, never by a file name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # [out, in]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, self.bias)


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Swap the Linears inside the decoder layers in place; returns how many were swapped."""
    if scheme != "int8":
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    swapped = 0
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
                    swapped += 1
    return swapped
