"""`threshold`: Fast-dLLM style confidence-threshold decoding over a fixed canvas.

The canvas is the prompt plus gen_length masks, cut into blocks decoded left to right. Each forward sees
everything after the committed prefix (later blocks' masks included); only the current block is filled:
every position whose max probability passes τ, at least the most confident one. Finished blocks are
committed to the KV cache by the next forward.
"""

from __future__ import annotations

from .blocks import Block, fill_block
from .window import WindowState, WindowStrategy


class ThresholdStrategy(WindowStrategy):
    name = "threshold"

    def initial_blocks(self, prompt_len: int) -> list[Block]:
        end = prompt_len + self.cfg.gen_length
        starts = range(prompt_len, end, self.cfg.block_size)
        return [Block(s, min(s + self.cfg.block_size, end), fully_active=True) for s in starts]

    def current(self, state: WindowState) -> Block | None:
        return next((b for b in state.blocks if not self.block_complete(state, b)), None)

    def fill(self, state: WindowState) -> list[int]:
        block = self.current(state)
        if block is None:
            return []
        return fill_block(state.canvas, block, self.spec.mask_id, self.cfg.tau,
                          state.pred_tok, state.pred_prob, state.pred_conf, state.pred_ok)

    def grow(self, state: WindowState) -> None:
        return None  # the canvas is fixed from the start

    def scored(self, state: WindowState) -> list[int]:
        block = self.current(state)
        if block is None:
            return []
        return (self.masked(state, block.start, block.end).nonzero()[:, 0] + block.start).tolist()
