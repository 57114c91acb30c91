"""Blocks of the generated region and the fill rule shared by every block-wise strategy (paper Eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Block:
    start: int  # absolute positions [start, end)
    end: int
    fully_active: bool = False  # must make progress: the top-1 fallback applies when nothing passes τ

    @property
    def size(self) -> int:
        return self.end - self.start


def progress(canvas: torch.Tensor, block: Block, mask_id: int) -> float:
    """Fraction of the block already filled."""
    return float((canvas[block.start:block.end] != mask_id).sum()) / block.size


def fill_block(
    canvas: torch.Tensor,
    block: Block,
    mask_id: int,
    tau: float,
    pred_tok: torch.Tensor,
    pred_prob: torch.Tensor,
    pred_conf: torch.Tensor,
    pred_ok: torch.Tensor,
) -> list[int]:
    """Fill {masked positions with prob > τ}; if none and the block is fully active, the single most
    confident one (ties: the lowest position). Writes into ``canvas``; returns the filled positions."""
    span = slice(block.start, block.end)
    open_ = (canvas[span] == mask_id) & pred_ok[span]
    if not bool(open_.any()):
        return []
    chosen = open_ & (pred_prob[span] > tau)
    if not bool(chosen.any()):
        if not block.fully_active:
            return []
        conf = torch.where(open_, pred_conf[span], torch.full_like(pred_conf[span], float("-inf")))
        chosen = torch.zeros_like(open_)
        chosen[int(torch.argmax(conf))] = True  # argmax returns the first maximum: the lowest position
    positions = (chosen.nonzero()[:, 0] + block.start).tolist()
    canvas[positions] = pred_tok[positions]
    return positions
