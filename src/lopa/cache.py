"""KV cache of one sequence: the committed prefix, plus scratch for the current forward's K branches.

Layout per layer: [Hkv, capacity, D]. Positions [0, length) are committed. A forward with K branches of
W columns writes its K/V to [length, length + K*W), branch r at length + r*W, and attends over
[0, length + K*W) with attention.branch_mask: the prefix is read once for all branches, never copied.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, Hkv, capacity, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0  # committed positions
        self.last_hidden: torch.Tensor | None = None  # [E] final hidden state at position length-1
        # Static mode (CUDA graphs): the window goes to these slots and attention reads [0, static_len).
        self.static_index: torch.Tensor | None = None  # [K*W] int64 device tensor
        self.static_len = 0

    def key_length(self, window: int) -> int:
        """Keys one forward attends over: the prefix plus the K*W window columns (or the static span)."""
        return self.static_len if self.static_index is not None else self.length + window

    def write_scratch(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K branches' window K/V ([K, Hkv, W, D]) after the prefix; return keys/values [Hkv, P+K*W, D]."""
        K, Hkv, W, D = k.shape
        if self.static_index is not None:  # addresses fixed for graph replay; slots computed on the device
            self.k[layer].index_copy_(1, self.static_index, k.transpose(0, 1).reshape(Hkv, K * W, D))
            self.v[layer].index_copy_(1, self.static_index, v.transpose(0, 1).reshape(Hkv, K * W, D))
            return self.k[layer, :, :self.static_len], self.v[layer, :, :self.static_len]
        end = self.length + K * W
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} < {end} positions needed")
        self.k[layer, :, self.length:end] = k.transpose(0, 1).reshape(Hkv, K * W, D)
        self.v[layer, :, self.length:end] = v.transpose(0, 1).reshape(Hkv, K * W, D)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, row: int, n: int, width: int, last_hidden: torch.Tensor) -> None:
        """Branch ``row``'s first n window columns (of a width-W forward) become committed positions."""
        P = self.length
        if row:  # source starts at P + row*W >= P + n: the copy never overlaps its destination
            src = P + row * width
            self.k[:, :, P:P + n] = self.k[:, :, src:src + n]
            self.v[:, :, P:P + n] = self.v[:, :, src:src + n]
        self.length = P + n
        self.last_hidden = last_hidden.detach().clone()

    def copy_prefix_from(self, other: "KVCache") -> None:
        n = other.length
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]
        self.length, self.last_hidden = n, other.last_hidden
