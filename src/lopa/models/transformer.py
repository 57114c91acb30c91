"""The decoder stack shared by Dream and Fast-dLLM v2 (Qwen2-style), LLaDA (LLaMA-style) and SDAR (Qwen3-style:
per-head q/k norms), with a KV-cache view; attention follows the mask it is given.

forward(tokens [B, T], start | positions [B, T], cache view, attn_mask) -> hidden [B, T, E] (after the final norm)
logits(hidden, cols, last_hidden) -> [B, C, V] float32 (float64 models: float64), logits for position cols[j]
predicting_hidden(hidden, last_hidden, first): the state each column's logits come from (the logit shift)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import CacheView
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
    """cos, sin for the rotate-half convention (Qwen2, LLaMA, LLaDA): positions [T] -> [T, D];
    [B, T] (one row per request) -> [B, 1, T, D], broadcasting over the heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # [..., T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]
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
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D features of q and k, before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps), RMSNorm(self.D, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: CacheView | None, layer: int, ops: Ops = EAGER) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        q, k = q.view(B, T, self.H, self.D), k.view(B, T, self.Hkv, self.D)
        if self.q_norm is not None:
            q, k = self.q_norm(q, ops), self.k_norm(k, ops)
        q = ops.rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k, v = k.transpose(1, 2), v.view(B, T, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, T, D], views
        if cache is None:  # independent rows; mask None, [T, T] or [B, T, T]
            m = None if mask is None else (mask[None, None] if mask.dim() == 2 else mask[:, None])
            out = attend(q, ops.rope(k, cos, sin), v, m).transpose(1, 2)  # [B, T, H, D]
        else:  # row b is one request's branches, flattened; its keys are its slot's prefix + this window
            ops.rope_write(*cache.rows(layer), cache.index, k, v, cos, sin)  # k RoPE'd on its way into the cache
            keys, values = cache.keys(layer)  # [B, Hkv, Lb, D]
            if isinstance(mask, torch.Tensor):  # additive [B, 1, T, Lb]
                out = attend(q, keys, values, mask)
                out = out.transpose(1, 2)  # [B, T, H, D]
            else:  # a FlexAttention BlockMask over the whole slot (models/attention.py: step_block_mask), the query
                # heads of each KV head on the query axis: [R, Hkv, (H / Hkv) * Q, D], each K/V tile read once; R
                # rows of Q queries: [B, T] itself, or a flat step's queries laid into its padded rows (cache.FlatView)
                rows = cache.to_rows(q)
                R, Q = rows.shape[0], rows.shape[2]
                if mask.kv_num_blocks.shape[1] > 1:  # the keys in chunks, one per extra query head (key_splits)
                    out = ops.split(rows, keys, values, mask)
                else:
                    out = ops.flex(rows.reshape(R, self.Hkv, self.H // self.Hkv * Q, self.D), keys, values,
                                   block_mask=mask)
                out = cache.from_rows(out.view(R, self.H, Q, self.D))  # [B, T, H, D]
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

    def forward(self, tokens: torch.Tensor, start: int = 0, cache: CacheView | None = None,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache, rows are independent sequences at positions start + arange(T); attn_mask None, bool
        [T, T] or [B, T, T]. With a cache view, row b is request b's window (its branches flattened), at
        ``positions`` [B, T], attending with the additive mask [B, 1, T, cache.Lb] or a FlexAttention BlockMask of
        that shape (the runner builds both from the packed step)."""
        B, T = tokens.shape
        if cache is not None:
            assert positions is not None and positions.shape == (B, T), positions
            assert attn_mask is not None, "a cache view needs the step's mask"
            shape = tuple(attn_mask.shape)  # [rows, ., Qk or (H / Hkv) * Qk packed queries, Lb]
            assert shape[0] == cache.B and shape[-1] == cache.Lb and shape[2] % cache.Qk == 0, shape
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta)
        x, delta = self.embed(tokens), None  # [B, T, E]
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, cos, sin, attn_mask, cache, i, self.ops)
        return self.ops.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]

    def predicting_hidden(self, hidden: torch.Tensor, last_hidden: torch.Tensor | None,
                          first: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, E] -> [B, T, E]: the state each column's logits come from. Dream predicts position i
        from the hidden state at i-1, so a window's column 0 uses the last committed position's state
        (``last_hidden`` [E] or [B, E], or [B, T, E]: each column's own, as a flat step's requests have; without
        it column 0 is NaN). ``first`` [B, T] bool marks the columns
        that start a branch when a row holds several branches flattened (default: column 0 only); the others
        read the column before them. Shape-static and sync-free, so CUDA graphs capture it as is."""
        if not self.config.logit_shift:
            return hidden
        B, T, E = hidden.shape
        if last_hidden is None:
            last = hidden.new_full((B, 1, E), float("nan"))
        elif last_hidden.dim() == 3:
            last = last_hidden.to(hidden.dtype)
        else:
            last = last_hidden.to(hidden.dtype).reshape(-1, 1, E).expand(B, 1, E)
        if first is None:
            return torch.cat([last, hidden[:, :-1]], dim=1)
        return torch.where(first[..., None], last, hidden.roll(1, dims=1))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., E] -> [..., V] logits in float32 (float64 for a float64 model)."""
        out = self.lm_head(hidden)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def logits(self, hidden: torch.Tensor, cols: torch.Tensor, last_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, E], cols [C] -> [B, C, V] (see head): the prediction for window position cols[j]."""
        if last_hidden is None and self.config.logit_shift and bool((cols < self.config.logit_shift).any()):
            raise ValueError("position 0 of the window needs the last committed hidden state (none cached)")
        return self.head(self.predicting_hidden(hidden, last_hidden)[:, cols])
