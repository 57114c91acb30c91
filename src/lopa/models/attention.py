"""Attention masks (bool, True = may attend) shared by the runner, the trainer and the tests."""

from __future__ import annotations

import torch


def block_causal_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """[T] block index per position -> [T, T]: position i sees j iff block(j) <= block(i) (D2F's mask)."""
    return block_ids[None, :] <= block_ids[:, None]


def branch_mask(
    P: int,
    K: int,
    W: int,
    block_ids: torch.Tensor | None = None,
    lengths: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mask for K branches of a W-column window over one shared P-position prefix: [K*W, P + K*W].

    Queries are the branches' columns flattened row-major (branch r, column i -> r*W + i); keys are the
    prefix followed by the branches' columns in the same order. Every query sees the whole prefix and only
    its own branch's columns: all of them (block_ids None) or those of its own and earlier blocks, never
    a padding column (col >= lengths[r]).
    """
    cols = torch.arange(W, device=device)
    within = torch.ones(W, W, dtype=torch.bool, device=device)  # [Wq, Wk]
    if block_ids is not None:
        within = block_causal_mask(block_ids.to(device))
    window = torch.block_diag(*[within] * K)  # [K*W, K*W]
    if lengths is not None:
        valid = cols[None, :] < torch.tensor(lengths, device=device)[:, None]  # [K, W]
        window &= valid.reshape(1, K * W)
    prefix = torch.ones(K * W, P, dtype=torch.bool, device=device)
    return torch.cat([prefix, window], dim=1)


def padded_branch_mask(P: torch.Tensor, W: torch.Tensor, block_ids: torch.Tensor, K: int, Wb: int, L: int) -> torch.Tensor:
    """branch_mask built on the device for a window padded to Wb columns, over a fixed span of L keys: [K*Wb, L].

    P (committed prefix length) and W (real window width) are 0-dim tensors and block_ids is [Wb] (padding
    columns: one block after the last), so nothing here reads a value on the host: CUDA graphs capture it
    and replay it for any P and W. Keys past the window, and padding columns as keys, are hidden.
    """
    dev = block_ids.device
    q = torch.arange(K * Wb, device=dev)
    q_branch, q_col = q // Wb, q % Wb  # [K*Wb]
    rel = torch.arange(L, device=dev) - P  # [L] key slot relative to the window start
    k_branch, k_col = rel.div(Wb, rounding_mode="floor"), rel.remainder(Wb)
    key_in_window = (rel >= 0) & (rel < K * Wb) & (k_col < W)
    own = (k_branch[None, :] == q_branch[:, None]) & (block_ids[k_col][None, :] <= block_ids[q_col][:, None])
    return (rel < 0)[None, :] | (key_in_window[None, :] & own)
