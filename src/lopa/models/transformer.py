"""The decoder stack shared by Dream (Qwen2-style) and LLaDA (LLaMA-style), bidirectional, with a branch-aware KV cache.

forward(tokens [B, T], start, cache, attn_mask) -> hidden [B, T, E] (after the final norm)
logits(hidden, cols, cache) -> [B, C, V] float32 (float64 models: float64), logits for position cols[j] (the logit shift is handled here)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from .config import ModelConfig
from .fused import EAGER, Ops

_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_NATIVE_GQA = _TORCH >= (2, 5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: Ops = EAGER) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for the rotate-half convention (Qwen2, LLaMA, LLaDA)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped KV heads: q [B, H, Tq, D], k/v [B, Hkv, Tk, D], mask bool broadcastable to [B, H, Tq, Tk]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _NATIVE_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _NATIVE_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.H, self.Hkv, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=cfg.qkv_bias)  # fused q, k, v
        self.o = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, ops: Ops = EAGER) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        q = ops.rope(q.view(B, T, self.H, self.D).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = ops.rope(k.view(B, T, self.Hkv, self.D).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        if cache is None:  # independent rows; mask None, [T, T] or [B, T, T]
            m = None if mask is None else (mask[None, None] if mask.dim() == 2 else mask[:, None])
            out = attend(q, k, v, m).transpose(1, 2)  # [B, T, H, D]
        else:  # B rows are branches over one shared prefix: queries flattened to one sequence of B*T
            keys, values = cache.write_scratch(layer, k, v)  # [Hkv, P + B*T, D]
            qf = q.transpose(0, 1).reshape(1, self.H, B * T, self.D)  # [1, H, B*T, D]
            out = attend(qf, keys[None], values[None], mask[None, None])  # [1, H, B*T, D]
            out = out[0].view(self.H, B, T, self.D).permute(1, 2, 0, 3)  # [B, T, H, D]
        return self.o(out.reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused gate, up
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops = EAGER) -> torch.Tensor:
        return self.down(ops.silu_mul(self.gate_up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, delta, cos, sin, mask, cache, layer, ops: Ops = EAGER):
        """x [B, T, E] is the residual stream without ``delta``, the previous layer's MLP output (None before
        the first layer); returns (x, delta) the same way, so each residual add runs inside the next norm."""
        if delta is None:
            h = self.attn_norm(x, ops)
        else:
            x, h = ops.add_rms_norm(x, delta, self.attn_norm.weight, self.attn_norm.eps)
        x, h = ops.add_rms_norm(x, self.attn(h, cos, sin, mask, cache, layer, ops), self.mlp_norm.weight, self.mlp_norm.eps)
        return x, self.mlp(h, ops)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.ops = EAGER  # models.fused: compiled() fuses the elementwise chains on a GPU

    def forward(self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` ([T], device) overrides start + arange(T): graph replays read them from a buffer."""
        B, T = tokens.shape
        if cache is not None:
            assert positions is not None or start == cache.length, (start, cache.length)
            assert attn_mask is not None and attn_mask.shape == (B * T, cache.key_length(B * T)), attn_mask.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta)
        x, delta = self.embed(tokens), None  # [B, T, E]
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, cos, sin, attn_mask, cache, i, self.ops)
        return self.ops.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]

    def predicting_hidden(self, hidden: torch.Tensor, last_hidden: torch.Tensor | None) -> torch.Tensor:
        """hidden [B, T, E] -> [B, T, E]: the state each column's logits come from. Dream predicts position i
        from the hidden state at i-1, so column 0 uses the last committed position (``last_hidden``; without
        it column 0 is NaN). Shape-static and sync-free, so CUDA graphs capture it as is."""
        if not self.config.logit_shift:
            return hidden
        B, _, E = hidden.shape
        first = hidden.new_full((B, 1, E), float("nan")) if last_hidden is None else last_hidden.to(hidden.dtype).expand(B, 1, E)
        return torch.cat([first, hidden[:, :-1]], dim=1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., E] -> [..., V] logits in float32 (float64 for a float64 model)."""
        out = self.lm_head(hidden)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def logits(self, hidden: torch.Tensor, cols: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """hidden [B, T, E], cols [C] -> [B, C, V] (see head): the prediction for window position cols[j]."""
        last = cache.last_hidden if cache is not None else None
        if last is None and self.config.logit_shift and bool((cols < self.config.logit_shift).any()):
            raise ValueError("position 0 of the window needs the last committed hidden state (none cached)")
        return self.head(self.predicting_hidden(hidden, last)[:, cols])
