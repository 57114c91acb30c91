"""`d2f`: Discrete Diffusion Forcing's pipelined block decoding.

After the prompt prefill one block of masks is active. A new block is appended when the last one is at
least τ_add filled (one per iteration, until gen_length or an EOS); a block becomes fully active once its
predecessor is at least τ_act filled (the first block is fully active at once). Semi-active blocks fill
only positions passing τ; fully active ones also fall back to their single most confident position.
The window is every uncommitted block and nothing beyond; attention inside it is block-causal by default
(D2F's training mask). Finished blocks at the head of the window are committed by the next forward.
"""

from __future__ import annotations

from .blocks import Block, fill_block, progress
from .window import WindowState, WindowStrategy


class D2FStrategy(WindowStrategy):
    name = "d2f"

    def initial_blocks(self, prompt_len: int) -> list[Block]:
        return [Block(prompt_len, prompt_len + min(self.cfg.block_size, self.cfg.gen_length), fully_active=True)]

    def activate(self, state: WindowState) -> None:
        for prev, block in zip(state.blocks, state.blocks[1:]):
            if not block.fully_active and progress(state.canvas, prev, self.spec.mask_id) >= self.cfg.complete_threshold:
                block.fully_active = True

    def fill(self, state: WindowState) -> list[int]:
        self.activate(state)  # from the state the predictions were made on
        filled: list[int] = []
        for block in state.blocks:
            if block.end > state.cached:
                filled += fill_block(state.canvas, block, self.spec.mask_id, self.cfg.tau,
                                     state.pred_tok, state.pred_prob, state.pred_conf, state.pred_ok)
        return filled

    def grow(self, state: WindowState) -> None:
        last = state.blocks[-1]
        limit = state.prompt_len + self.cfg.gen_length
        if last.end < limit and state.eos_at is None and progress(state.canvas, last, self.spec.mask_id) >= self.cfg.add_threshold:
            state.blocks.append(Block(last.end, min(last.end + self.cfg.block_size, limit)))
            self.activate(state)

    def scored(self, state: WindowState) -> list[int]:
        lo, hi = state.cached, self.window_end(state)
        return (self.masked(state, lo, hi).nonzero()[:, 0] + lo).tolist()
