"""Decoding over a window of blocks after a committed prefix, with optional LoPA branching.

`threshold` and `d2f` subclass WindowStrategy and differ only in their block pipeline (which blocks exist,
which may be filled, where the window ends). LoPA (lookahead > 0) branches over either pipeline; with
lookahead 0 the very same loop is plain threshold / D2F decoding.

Per decode forward: the rows are the anchor (the current canvas, whose fills were already applied from
the previous winner's predictions) and up to k lookaheads, each the anchor plus ONE more position filled
with its predicted token. After the forward the winner is the argmax branch confidence (ties: the lower
row, so the anchor wins ties); its tokens become the canvas, its predictions drive the next fill.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from .base import DecodeState, ForwardBatch, ModelSpec, Predictions, Step, Strategy, answer_ids, new_canvas, settle_eos
from .blocks import Block
from .budget import BUDGETS, Landscape
from .confidence import branch_score


@dataclass
class WindowState(DecodeState):
    blocks: list[Block] = field(default_factory=list)
    pred_tok: torch.Tensor | None = None  # [T] the winner's predicted token per position (valid where pred_ok)
    pred_prob: torch.Tensor | None = None  # [T] in the predictions' dtype (float32; float64 for a float64 model)
    pred_conf: torch.Tensor | None = None  # [T] likewise
    pred_ok: torch.Tensor | None = None  # [T] bool
    prefilled: bool = False
    eos_at: int | None = None  # first EOS in the generated region
    pending: tuple = ()  # (scored positions, lookahead position per row) of the batch in flight
    last_fill: int = 0  # positions the last iteration filled (the "text" branch budget reads it)


class WindowStrategy(Strategy):
    """The shared loop. Subclasses define the block pipeline through the four hooks below."""

    def __init__(self, cfg, spec: ModelSpec, lookahead: int = 0) -> None:
        super().__init__(cfg, spec)
        self.lookahead = lookahead
        self.score = branch_score(cfg)
        self.budget = BUDGETS[cfg.k_policy]
        self.rng = torch.Generator().manual_seed(cfg.seed)  # for score functions that draw (the random ablation)
        self.max_rounds = cfg.max_rounds or 2 * cfg.gen_length + 8

    def largest_forward(self, prompt_len: int) -> int:
        return (self.lookahead + 1) * self.cfg.gen_length  # K rows of a window after the prompt: W <= gen_length

    # -- pipeline hooks -----------------------------------------------------------------------------
    @abstractmethod
    def initial_blocks(self, prompt_len: int) -> list[Block]:
        """Blocks present before the first decode forward."""

    @abstractmethod
    def fill(self, state: WindowState) -> list[int]:
        """Apply the fill rule with the current predictions; return the positions filled."""

    @abstractmethod
    def grow(self, state: WindowState) -> None:
        """Add blocks if the pipeline wants more (d2f); called before each forward."""

    @abstractmethod
    def scored(self, state: WindowState) -> list[int]:
        """Positions that may be filled next: lookahead candidates and the set branch confidence averages over."""

    # -- shared helpers -------------------------------------------------------------------------------
    def masked(self, state: WindowState, lo: int, hi: int) -> torch.Tensor:
        return state.canvas[lo:hi] == self.spec.mask_id

    def window_end(self, state: WindowState) -> int:
        return state.blocks[-1].end

    def block_complete(self, state: WindowState, block: Block) -> bool:
        return not bool(self.masked(state, block.start, block.end).any())

    def settle_eos(self, state: WindowState) -> None:
        state.eos_at = settle_eos(state.canvas, state.prompt_len, self.spec)

    def finished(self, state: WindowState) -> bool:
        covered = state.blocks[-1].end - state.prompt_len
        all_filled = not bool(self.masked(state, state.prompt_len, state.blocks[-1].end).any())
        return all_filled and (state.eos_at is not None or covered >= self.cfg.gen_length)

    def stopped(self, state: WindowState) -> bool:
        """Finished, or out of rounds (DecodeConfig.max_rounds): marks the state done and says so."""
        if self.finished(state):
            state.done = True
        elif state.rounds >= self.max_rounds:
            state.done = state.hit_round_cap = True
        return state.done

    def commit_end(self, state: WindowState) -> int:
        """End of the leading run of complete blocks after the committed prefix."""
        end = state.cached
        for block in state.blocks:
            if block.end <= end:
                continue
            if block.start != end or not self.block_complete(state, block):
                break
            end = block.end
        return end

    # -- Strategy -----------------------------------------------------------------------------------
    def start(self, prompt: list[int]) -> WindowState:
        canvas = new_canvas(prompt, self.cfg.gen_length, self.spec)
        P, T = len(prompt), len(canvas)
        return WindowState(
            canvas=canvas, prompt_len=P, blocks=self.initial_blocks(P),
            pred_tok=torch.zeros(T, dtype=torch.int64), pred_prob=torch.zeros(T), pred_conf=torch.zeros(T),
            pred_ok=torch.zeros(T, dtype=torch.bool),
        )

    def propose(self, state: WindowState) -> ForwardBatch | None:
        if not state.prefilled:  # the prompt alone, bidirectional within itself; its K/V are committed
            state.prefilled = True
            P = state.prompt_len
            return ForwardBatch(state.canvas[None, :P].clone(), 0, torch.empty(0, dtype=torch.int64), commit=P, prefill=True)
        self.grow(state)
        if self.stopped(state):
            return None
        lo, hi = state.cached, self.window_end(state)
        scored = self.scored(state)
        tokens = self.branch_rows(state, lo, hi, scored)
        block_ids = None
        if self.cfg.window_attention == "block_causal":
            block_ids = torch.cat([torch.full((b.end - max(b.start, lo),), i) for i, b in enumerate(state.blocks) if b.end > lo])
        cols = self.masked(state, lo, hi).nonzero()[:, 0]
        return ForwardBatch(tokens, lo, cols, commit=self.commit_end(state) - lo, block_ids=block_ids)

    def branch_rows(self, state: WindowState, lo: int, hi: int, scored: list[int]) -> torch.Tensor:
        """[K, hi - lo]: the anchor (the canvas) and one row per lookahead, each the anchor plus one more
        position filled with its predicted token; records them in ``state.pending`` for accept."""
        anchor = state.canvas[lo:hi]
        rows, extra = [anchor], [None]
        for pos in self.lookahead_positions(state, scored):
            row = anchor.clone()
            row[pos - lo] = state.pred_tok[pos]
            rows.append(row)
            extra.append(pos)
        state.pending = (scored, extra)
        return torch.stack(rows)

    def lookahead_positions(self, state: WindowState, scored: list[int]) -> list[int]:
        """The most confident still-masked candidates (ties: lower position), each spawning one branch: k of
        them, or fewer as DecodeConfig.k_policy decides (decoding/budget.py)."""
        if not self.lookahead:
            return []
        cands = [p for p in scored if bool(state.pred_ok[p])]
        cands.sort(key=lambda p: (-float(state.pred_conf[p]), p))
        if self.cfg.k_policy == "fixed":
            return cands[: self.lookahead]
        width = self.window_end(state) - state.cached
        land = Landscape(state.pred_conf[cands], state.last_fill, width, state.row_budget)
        return cands[: self.budget(self.lookahead, land)]

    def accept(self, state: WindowState, batch: ForwardBatch, preds: Predictions) -> int:
        if batch.prefill:
            state.cached += batch.commit
            return 0
        scored, extra = state.pending
        K = batch.tokens.shape[0]
        scores: list[float] = []
        winner = 0
        if K > 1:
            score = self.branch_scores(batch, preds, scored, extra)  # [K]
            winner = int(torch.argmax(score))  # first maximum: ties go to the lower row
            scores = score.tolist()
        fills = [len(self.apply_row(self.what_if(state, batch), batch, preds, r, extra)) for r in range(K)] \
            if self.cfg.trace and K > 1 else []
        state.cached += batch.commit
        state.rounds += 1
        filled = self.apply_row(state, batch, preds, winner, extra)
        state.last_fill = len(filled)
        if self.cfg.trace:
            state.trace.append(Step(filled, winner, scores, fills))
        return winner

    def branch_scores(self, batch: ForwardBatch, preds: Predictions, scored: list[int], extra: list) -> torch.Tensor:
        """[K] each row's branch confidence over its still-masked positions of the scored set."""
        lo = batch.start
        col_of = {int(c): j for j, c in enumerate(batch.logit_cols)}
        in_set = torch.zeros(len(col_of), dtype=torch.bool)
        in_set[[col_of[p - lo] for p in scored if p - lo in col_of]] = True
        still = batch.tokens[:, batch.logit_cols] == self.spec.mask_id  # [K, C]
        return self.score(preds.conf, still & in_set, self.rng)

    def apply_row(self, state: WindowState, batch: ForwardBatch, preds: Predictions, row: int, extra: list) -> list[int]:
        """Make ``row`` the canvas, its predictions the current ones, then fill; return the positions filled.
        ``state.cached`` already counts this forward's commit (the fill rule reads it)."""
        lo, hi = batch.start, batch.start + batch.tokens.shape[1]
        state.canvas[lo:hi] = batch.tokens[row]
        positions = lo + batch.logit_cols
        if state.pred_prob.dtype != preds.prob.dtype:  # float32, or float64 for a float64 model: keep its precision
            state.pred_prob, state.pred_conf = state.pred_prob.to(preds.prob.dtype), state.pred_conf.to(preds.conf.dtype)
        state.pred_ok[:] = False
        state.pred_ok[positions] = True
        state.pred_tok[positions] = preds.tokens[row]
        state.pred_prob[positions] = preds.prob[row].to(state.pred_prob.dtype)
        state.pred_conf[positions] = preds.conf[row].to(state.pred_conf.dtype)
        filled = [extra[row]] if extra[row] is not None else []
        self.settle_eos(state)
        filled += self.fill(state)
        self.settle_eos(state)
        return filled

    @staticmethod
    def what_if(state: WindowState, batch: ForwardBatch) -> WindowState:
        """A copy of the state after this forward's commit, for asking what a row would fill (traces only)."""
        return dataclasses.replace(
            state, canvas=state.canvas.clone(), blocks=[dataclasses.replace(b) for b in state.blocks],
            pred_tok=state.pred_tok.clone(), pred_prob=state.pred_prob.clone(), pred_conf=state.pred_conf.clone(),
            pred_ok=state.pred_ok.clone(), cached=state.cached + batch.commit, trace=[])

    def output(self, state: WindowState) -> list[int]:
        return answer_ids(state.canvas, state.prompt_len, self.spec)
