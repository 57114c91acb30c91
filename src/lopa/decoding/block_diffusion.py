"""`sdar` and `fast_dllm_v2`: the block-diffusion models' own decoding loops, on the shared window loop.

Block-diffusion models attend causally across blocks and bidirectionally inside one; blocks are aligned at
absolute position 0 (block b = positions [b*S, (b+1)*S), S = block_size), not at the prompt's end.

    prefill   the prompt's whole blocks, under the block-causal mask; their K/V are committed. The prompt's
              leftover tokens belong to the first generated block and are part of every window over it.
    window    [committed prefix end, active block end): the block being decoded, preceded by a finished
              block whose K/V are not committed yet (see "folded commit"). Block-causal: a finished block
              never sees the active one, so its K/V here are exactly those of a forward over it alone.
    fill      in the active region only, every mask with p > tau, else the most confident one (tau = 1.0:
              one token a step, SDAR's fixed-steps loop). The mask id is never proposed.
    EOS       masks after an EOS stay masks (the published loops keep decoding them); the request ends
              when every position its rule needs is filled (see each class).

Folded commit: the published loops cache a finished block by one extra forward over the clean block. Here
the forward that starts the next block carries the finished block in its window and commits its K/V
(``ForwardBatch.commit``): equal K/V, one forward fewer per block (``DecodeConfig.fold_commit=False``
runs the extra forward instead; tests/decoding/test_block_diffusion.py checks both give the same tokens).

LoPA over these loops (``strategy="lopa", base="sdar" | "fast_dllm_v2"``): k lookahead branches, each the
anchor plus one more of the active region's most confident masks, verified in the same forward; with k = 0
the loop is exactly the model's own (window.py's contract).

What a branch's score (Eq. 2) averages over (``DecodeConfig.score_span``):
    active       its unfilled positions of the active region. In a small region a lookahead often fills its
                 last mask; its set is then empty and it scores +inf (confidence.py), so it wins whatever
                 token it forced in.
    next_region  (the default) those plus the next region's positions (SDAR: the next block; Fast-dLLM v2: the next
                 sub-block), carried in the window as masks when the forward branches. Under the block-causal
                 mask they see the branch's tokens, so every branch has a non-empty set and the one that
                 completes the region is scored by how well the next region reads after it. Candidates and
                 fills stay in the active region. A branch that completed the region predicted the next one
                 exactly as the next forward would (same tokens before it, same masks in it), so when it wins
                 the fill goes on there (the paper's "logits repurposed for the subsequent decoding step");
                 predictions past the current block made while it still had a mask are dropped.
A lookahead writes the previous forward's guess into a mask; ``verify_lookahead`` lets it compete only if the
anchor row of the same forward (every token of the branch but that one) still predicts that token there, else it
scores -inf. In small regions the candidates are the leftovers below tau, whose guesses often change once their
neighbours are filled (docs/results.md: block-diffusion models).

These classes are the specification of the engine's device iteration for the same requests
(decoding/batched_blocks.py vectorizes their rules over slot rows; fold_commit=False stays on the host).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import DecodeState, ForwardBatch, ModelSpec, Predictions, first_eos
from .blocks import Block, fill_block
from .window import WindowState, WindowStrategy


class BlockDiffusionStrategy(WindowStrategy):
    """What SDAR and Fast-dLLM v2 share; subclasses name the active region and the stop rule."""

    separate_commit = True  # whether fold_commit=False runs an extra forward over each finished block

    def __init__(self, cfg, spec: ModelSpec, lookahead: int = 0) -> None:
        super().__init__(cfg, spec, lookahead)
        if spec.block_size is not None and cfg.block_size != spec.block_size:
            raise ConfigError(f"block_size: this model was trained with blocks of {spec.block_size}, "
                              f"got {cfg.block_size}")
        self.size = cfg.block_size

    def kv_need(self, prompt_len: int, gen_length: int) -> int:
        """KV positions a request's slot must hold: a forward writes K rows of at most two blocks (+1 column;
        + the next region under score_span "next_region") after a committed prefix that is at most the canvas,
        plus the trash slot."""
        blocks = 3 if self.cfg.score_span == "next_region" else 2
        return prompt_len + gen_length + (self.lookahead + 1) * (blocks * self.size + 1) + 1

    # -- the block layout ---------------------------------------------------------------------------
    def initial_blocks(self, prompt_len: int) -> list[Block]:
        end = prompt_len + self.cfg.gen_length
        first = prompt_len // self.size * self.size
        return [Block(s, min(s + self.size, end), fully_active=True) for s in range(first, end, self.size)]

    def current(self, state: WindowState) -> Block | None:
        """The first block with a mask left. Blocks are decoded in order and those before the committed prefix
        are complete, so the search starts at the block holding position ``cached`` (a few checks, not all)."""
        first = max(0, (state.cached - state.blocks[0].start) // self.size)
        return next((b for b in state.blocks[first:] if not self.block_complete(state, b)), None)

    def active(self, state: WindowState) -> Block | None:
        """The region the fill rule works on now (None: nothing left)."""
        return self.current(state)

    def stop_end(self, state: WindowState) -> int:
        """Everything in [prompt_len, stop_end) must be filled before the request ends."""
        return state.blocks[-1].end

    def grow(self, state: WindowState) -> None:
        return None  # every block exists from the start

    def region_width(self) -> int:
        """Positions of a full active region: a block (Fast-dLLM v2: a sub-block)."""
        return self.size

    def next_region(self, state: WindowState, region: Block) -> Block | None:
        """The region decoded after ``region`` (None after the last): regions tile each block from its start."""
        end = min(region.end + self.region_width(), state.blocks[-1].end)
        return Block(region.end, end, fully_active=True) if end > region.end else None

    def fill(self, state: WindowState) -> list[int]:
        region = self.active(state)
        if region is None:
            return []
        current = self.current(state)
        state.pred_ok[current.end:] = False  # made while the current block had a mask: not what its next forward sees
        return fill_block(state.canvas, region, self.spec.mask_id, self.cfg.tau,
                          state.pred_tok, state.pred_prob, state.pred_conf, state.pred_ok)

    def scored(self, state: WindowState) -> list[int]:
        region = self.active(state)
        if region is None:
            return []
        return (self.masked(state, region.start, region.end).nonzero()[:, 0] + region.start).tolist()

    def settle_eos(self, state: WindowState) -> None:
        state.eos_at = first_eos(state.canvas, state.prompt_len, self.spec)  # record it; fill nothing after it

    def finished(self, state: WindowState) -> bool:
        return not bool(self.masked(state, state.prompt_len, self.stop_end(state)).any())

    def block_ids(self, lo: int, hi: int) -> torch.Tensor:
        return torch.arange(lo, hi) // self.size  # [hi - lo] absolute block index per column

    # -- Strategy -----------------------------------------------------------------------------------
    def prefill(self, state: WindowState) -> ForwardBatch | None:
        """The prompt's whole blocks, block-causal (None when the prompt is shorter than a block)."""
        n = state.prompt_len // self.size * self.size
        if not n:
            return None
        return ForwardBatch(state.canvas[None, :n].clone(), 0, torch.empty(0, dtype=torch.int64), commit=n,
                            block_ids=self.block_ids(0, n), prefill=True)

    def propose(self, state: WindowState) -> ForwardBatch | None:
        if not state.prefilled:
            state.prefilled = True
            batch = self.prefill(state)
            if batch is not None:
                return batch
        if self.stopped(state):
            return None
        lo, end = state.cached, self.commit_end(state)
        if self.separate_commit and not self.cfg.fold_commit and end > lo:  # the published loop's cache update
            state.pending = ([], [None])
            tokens = state.canvas[None, lo:end].clone()
            return ForwardBatch(tokens, lo, torch.empty(0, dtype=torch.int64), commit=end - lo,
                                block_ids=self.block_ids(lo, end))
        hi = self.window_end(state)
        scored = self.scored(state)
        tokens = self.branch_rows(state, lo, hi, scored)
        if self.cfg.score_span == "next_region" and tokens.shape[0] > 1:
            tokens, hi = self.carry_next_region(state, tokens, hi, scored)
        # predictions for every mask of the window (the active block, + the next region when carried): the fill
        # uses the active region's; a Fast-dLLM v2 lookahead that completes a sub-block leaves the next one
        # predicted, ready to branch on
        cols = self.masked(state, lo, hi).nonzero()[:, 0]
        return ForwardBatch(tokens, lo, cols, commit=end - lo, block_ids=self.block_ids(lo, hi))

    def carry_next_region(self, state: WindowState, tokens: torch.Tensor, hi: int, scored: list[int]):
        """tokens [K, hi - lo] -> [K, hi' - lo]: the window runs to the end of the region after the active one
        (its masks: every row the same), and the score set of the pending forward takes its masks too."""
        nxt = self.next_region(state, self.active(state))
        if nxt is None:
            return tokens, hi
        end = max(hi, nxt.end)
        extra = state.canvas[hi:end].expand(tokens.shape[0], -1)  # [K, end - hi] masks
        score_set = scored + (self.masked(state, nxt.start, nxt.end).nonzero()[:, 0] + nxt.start).tolist()
        state.pending = (score_set, state.pending[1])
        return torch.cat([tokens, extra], 1), end

    def window_end(self, state: WindowState) -> int:
        return self.current(state).end

    def branch_scores(self, batch: ForwardBatch, preds: Predictions, scored: list[int], extra: list) -> torch.Tensor:
        """Eq. 2, and under ``verify_lookahead`` a lookahead whose token the anchor row of this forward does not
        predict at its position scores -inf (the anchor row holds the branch's tokens but that one)."""
        score = super().branch_scores(batch, preds, scored, extra)  # [K]
        if not self.cfg.verify_lookahead:
            return score
        look = torch.tensor(extra[1:]) - batch.start  # [K-1] window column of each lookahead
        cols = torch.searchsorted(batch.logit_cols, look)  # [K-1] its predicted column (a mask in the anchor row)
        drafted = batch.tokens[1:].gather(1, look[:, None])[:, 0]  # [K-1] the token the branch placed there
        agree = torch.cat([torch.ones(1, dtype=torch.bool), preds.tokens[0, cols] == drafted])  # [K]
        return score.masked_fill(~agree, float("-inf"))

    def accept(self, state: DecodeState, batch: ForwardBatch, preds: Predictions) -> int:
        if batch.prefill and batch.logit_cols.numel():  # a prefill that also predicts (Fast-dLLM v2's first token)
            state.cached += batch.commit
            self.apply_row(state, batch, preds, 0, [None])
            return 0
        return super().accept(state, batch, preds)


class SDARStrategy(BlockDiffusionStrategy):
    """SDAR: the active block is filled until complete; decoding ends once the block holding the first EOS
    is complete (the published loop checks for a stop id after each block)."""

    name = "sdar"

    def stop_end(self, state: WindowState) -> int:
        if state.eos_at is None:
            return state.blocks[-1].end
        return next(b.end for b in state.blocks if b.start <= state.eos_at < b.end)


class FastDLLMv2Strategy(BlockDiffusionStrategy):
    """Fast-dLLM v2: each block in sub-blocks of ``sub_block`` positions, left to right; the forward over a
    completed block also predicts the next block's first position, which is filled with that (greedy) token
    before the next block is denoised, so a block's first position is never a mask when its sub-blocks run
    (for the first generated block when the prompt ends on a block boundary, the prefill predicts it).
    Decoding ends once the first EOS has no mask before it.

    That forward is needed anyway (the next block's first token is its output), so the commit of the
    completed block rides on it and ``fold_commit`` changes nothing here."""

    name = "fast_dllm_v2"
    separate_commit = False

    def first_token_pending(self, state: WindowState, block: Block) -> bool:
        return block.start >= state.prompt_len and bool(state.canvas[block.start] == self.spec.mask_id)

    def active(self, state: WindowState) -> Block | None:
        block = self.current(state)
        if block is None:
            return None
        if self.first_token_pending(state, block):
            return Block(block.start, block.start + 1, fully_active=True)  # filled whatever its confidence
        for s in range(block.start, block.end, self.cfg.sub_block):
            sub = Block(s, min(s + self.cfg.sub_block, block.end), fully_active=True)
            if not self.block_complete(state, sub):
                return sub
        return None

    def window_end(self, state: WindowState) -> int:
        block = self.current(state)
        return block.start + 1 if self.first_token_pending(state, block) else block.end

    def region_width(self) -> int:
        return self.cfg.sub_block  # the next region is the next sub-block: in this block, or the next one's first

    def stop_end(self, state: WindowState) -> int:
        return state.blocks[-1].end if state.eos_at is None else state.eos_at

    def prefill(self, state: WindowState) -> ForwardBatch | None:
        batch = super().prefill(state)
        if batch is None or batch.commit != state.prompt_len:
            return batch
        n = batch.commit  # the prompt ends on a block boundary: one more column predicts the first token
        return ForwardBatch(state.canvas[None, :n + 1].clone(), 0, torch.tensor([n]), commit=n,
                            block_ids=self.block_ids(0, n + 1), prefill=True)
