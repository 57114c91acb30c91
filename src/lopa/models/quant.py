"""Quantized decoder Linears, chosen by RunnerConfig.quantize (never by a file name). The embeddings, norms
and lm_head stay in full precision in both schemes.

int8: weight-only. int8 weights with one scale per output channel (symmetric, round to nearest);
activations stay in the model's dtype and the weight is dequantized per call. This halves (bf16) or quarters
(fp32) the weight memory; it is not a faster kernel.

fp8: W8A8 in float8 e4m3 (the paper's Ascend path is W8A8 too). Weights get one scale per output channel,
activations one scale per row computed at run time (dynamic), and the product is one scaled GEMM with
float32 accumulation: torch._scaled_mm on the fp8 tensor cores of Hopper and Ada GPUs; elsewhere
scaled_mm_reference, the same quantized product in float32 ops, so that its accuracy cost can be measured
on a CPU."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# fp8 GEMMs run on rows padded to a multiple of this: on an H200, cuBLAS's fp8 kernels took 11.6 ms for the
# 28 layers' GEMMs at 704 rows and 10.4 ms at 768 (benchmarks/results/gemm_rows.md); padding is free inside
# the quantizer's kernel, and the padded rows are zeros whose outputs are dropped.
ROW_MULTIPLE = 128


def quantize_rows(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] -> (fp8 e4m3 [R, N], float32 scales [R, 1]), R = rows or M: row m is x[m] / scale[m], its
    largest magnitude mapped to the format's largest value (448); rows past M are zeros.
    models/fused.compiled() turns this into one kernel."""
    if rows is not None and rows > x.shape[0]:
        x = F.pad(x, (0, 0, 0, rows - x.shape[0]))
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


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


class Fp8Linear(nn.Module):
    """y = (x quantized per row) @ (W quantized per output channel)^T * scales + bias, in one scaled GEMM."""

    def __init__(self, linear: nn.Linear, quantize: Callable = quantize_rows) -> None:
        super().__init__()
        qweight, scale = quantize_rows(linear.weight.detach())  # rows of [out, in] = output channels
        self.register_buffer("qweight", qweight)  # [out, in] fp8
        self.register_buffer("scale", scale.t().contiguous())  # [1, out] float32
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantize = quantize  # the activations' quantizer: quantize_rows, or its fused (compiled) form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # [M, in]
        M = rows.shape[0]
        xq, xscale = self.quantize(rows, -(-M // ROW_MULTIPLE) * ROW_MULTIPLE)  # [R, in] fp8, [R, 1]
        if x.is_cuda:  # fp8 tensor cores (load_model checks the GPU has them)
            out = torch._scaled_mm(xq, self.qweight.t(), scale_a=xscale, scale_b=self.scale, bias=self.bias,
                                   out_dtype=x.dtype)  # [R, out]
        else:
            out = scaled_mm_reference(xq, self.qweight, xscale, self.scale, self.bias, x.dtype)
        return out[:M].view(*lead, self.out_features)


def scaled_mm_reference(xq: torch.Tensor, wq: torch.Tensor, xscale: torch.Tensor, wscale: torch.Tensor,
                        bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What torch._scaled_mm computes, in plain float32 ops (any device, any torch): the fp8 values' products
    are exact in float32 and summed there, then scaled per row and per column, then the bias is added.
    xq [M, K], wq [N, K] fp8; xscale [M, 1], wscale [1, N] float32 -> [M, N] in dtype."""
    out = (xq.float() @ wq.float().t()) * xscale * wscale
    return (out if bias is None else out + bias.float()).to(dtype)


def quantize_model(model: nn.Module, scheme: str, quantize: Callable = quantize_rows) -> int:
    """Swap the Linears inside the decoder layers in place; returns how many were swapped. ``quantize`` is
    the fp8 activation quantizer (load_model passes the fused one on a GPU)."""
    if scheme not in ("int8", "fp8"):
        raise ValueError(f"unknown quantization scheme {scheme!r}")
    swapped = 0
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child) if scheme == "int8" else Fp8Linear(child, quantize))
                    swapped += 1
    return swapped
