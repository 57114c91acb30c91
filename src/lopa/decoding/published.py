"""`compat="published"`: the decode loop of the published LoPA code, reproduced token for token (Dream family).

Source: zhijie-group/LoPA @ 433177a, `scale_dream_d2f/scale_dream_d2f.py`, `DreamLoRA._generate_enhanced_speculative`
with the settings of its scripts (greedy, branch score over every mask of the unfinished suffix, base branch
competing). docs/fidelity.md lists how this differs from the paper and from lopa's default mode; in short:

- every branch keeps its own block list; a block is added to a branch when its last block is at least
  ``add_threshold`` decoded, so branches of one round can differ in length (rows are padded, padding hidden);
- the prompt is not prefilled: the first forward holds the prompt and the first block, attending to each
  other, and the prompt's K/V come from that forward;
- a block's K/V are written by the forward after it finished, from the winner's row ("delayed cache");
- the τ test uses the max probability; the fallback, the lookahead ranking and the branch score use
  ``confidence`` (negative entropy in the published scripts); the mask token may be predicted, and a
  predicted mask leaves its position masked, which can keep a run going forever (``max_rounds`` stops it);
- k lookaheads are the published branching factor k (k = 1 cannot be expressed there); a lookahead wins ties;
- EOS only stops new blocks; the output is every generated block, and a run's "steps" are its rounds + 1.

Identical branches share one batch row, so ties between them resolve exactly as in one-branch-per-forward
execution. The runner's counters stay lopa's: one decode forward per round, tokens up to the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PromptTooLongError
from .base import DecodeState, ForwardBatch, ModelSpec, PredictSpec, Predictions, Step, Strategy

ACTIVE, TO_CACHE, IN_CACHE = "active", "to_cache", "in_cache"


@dataclass
class PBlock:
    start: int
    end: int
    masks: int  # still-masked positions, as last counted (the published `mask_count`)
    state: str  # active | to_cache | in_cache
    complete: bool  # "fully activated": may use the top-1 fallback (the published `is_complete`)

    @property
    def total(self) -> int:
        return self.end - self.start


@dataclass
class PBranch:
    tokens: torch.Tensor  # [T_b] int64: prompt + this branch's blocks (mask id where unfilled)
    blocks: list[PBlock]  # block 0 is the prompt
    ident: int  # the published branch_id: orders a round's rows together with is_base
    is_base: bool
    eos: bool = False  # an EOS was written: no more blocks for this branch
    active: bool = True
    finished_at: int | None = None  # the round that found it finished (the published steps_completed)

    def copy(self, ident: int, is_base: bool) -> "PBranch":
        blocks = [PBlock(b.start, b.end, b.masks, b.state, b.complete) for b in self.blocks]
        return PBranch(self.tokens.clone(), blocks, ident, is_base, self.eos, self.active, self.finished_at)


@dataclass
class PublishedState(DecodeState):
    branches: list[PBranch] = field(default_factory=list)  # finished ones first, then the live ones
    output_branch: PBranch | None = None
    # the round in flight: its rows in run order, the batch row of each, shared-prefix end, blocks being cached
    pending: tuple = ()


class PublishedStrategy(Strategy):
    name = "lopa"

    def __init__(self, cfg, spec: ModelSpec) -> None:
        super().__init__(cfg, spec)
        self.lookahead = cfg.k
        self.max_blocks = cfg.gen_length // cfg.block_size
        self.max_rounds = cfg.max_rounds or 2 * cfg.gen_length + 8
        self.eos = spec.eos_ids[0]  # the tokenizer's EOS only (lopa's default also stops at chat-turn ends)

    @property
    def predict_spec(self) -> PredictSpec:
        return PredictSpec(0.0, 1.0, self.cfg.confidence, ())  # the mask token is not suppressed

    def largest_forward(self, prompt_len: int) -> int:
        return (self.lookahead + 1) * self.max_blocks * self.cfg.block_size  # k lookaheads + the base, W <= its blocks

    # -- Strategy -----------------------------------------------------------------------------------
    def start(self, prompt: list[int]) -> PublishedState:
        P = len(prompt)
        if P + self.max_blocks * self.cfg.block_size > self.spec.max_length:
            raise PromptTooLongError(f"prompt ({P} tokens) + {self.max_blocks} blocks of {self.cfg.block_size} "
                                     f"exceed the context ({self.spec.max_length})")
        tokens = torch.tensor(prompt, dtype=torch.int64)
        root = PBranch(tokens, [PBlock(0, P, 0, TO_CACHE, True)], 0, True)
        return PublishedState(canvas=tokens.clone(), prompt_len=P, branches=[root])

    def propose(self, state: PublishedState) -> ForwardBatch | None:
        round_no = state.rounds + 1
        for b in [b for b in state.branches if b.active]:
            self._grow(b)
            self._mark_complete(b)
            if not bool((b.tokens == self.spec.mask_id).any()) and all(x.state != ACTIVE for x in b.blocks):
                b.active = False
                b.finished_at = round_no
        live = [b for b in state.branches if b.active]
        if not live:
            self._finish(state)
            return None
        if state.rounds >= self.max_rounds:  # the published loop has no cap; stop here, as the fixtures do
            state.canvas = next((b for b in live if b.is_base), live[0]).tokens.clone()
            state.done = state.hit_round_cap = True
            return None
        S = self._shared_prefix_end(live)
        layout = next((b for b in live if b.is_base), live[0])
        caching = [i for i, x in enumerate(layout.blocks) if x.state == TO_CACHE and x.end <= S]
        lo = min(layout.blocks[i].start for i in caching) if caching else S
        commit = max(layout.blocks[i].end for i in caching) - lo if caching else 0
        if lo != state.cached:
            raise RuntimeError(f"published layout starts at {lo} but the cache holds {state.cached} positions")
        order = sorted(live, key=lambda b: (b.is_base, b.ident))  # lookaheads in creation order, base last
        rows: list[torch.Tensor] = []
        row_of: list[int] = []
        for b in order:  # identical branches share one row (and so score identically, as upstream)
            window = b.tokens[lo:]
            if len(window) <= S - lo:  # upstream drops such a branch unscored; a finished layout never gets here
                raise RuntimeError("published mode: a live branch has no positions after the shared prefix")
            same = next((i for i, r in enumerate(rows) if r.shape == window.shape and torch.equal(r, window)), None)
            if same is None:
                rows.append(window)
                same = len(rows) - 1
            row_of.append(same)
        W = max(len(r) for r in rows)
        lengths = tuple(len(r) for r in rows)
        tokens = torch.full((len(rows), W), self.spec.mask_id, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        state.pending = (order, row_of, S, caching)
        cols = torch.arange(S - lo, W)
        return ForwardBatch(tokens, lo, cols, commit=commit, lengths=None if len(set(lengths)) == 1 else lengths)

    def accept(self, state: PublishedState, batch: ForwardBatch, preds: Predictions) -> int:
        order, row_of, S, caching = state.pending
        scores = [self._score(b, preds, row_of[i], S) for i, b in enumerate(order)]
        winner = max(range(len(order)), key=lambda i: (scores[i], -i))  # stable descending: the earlier row on ties
        best = order[winner]
        row = row_of[winner]
        state.cached += batch.commit
        state.rounds += 1

        active_ids = [i for i, x in enumerate(best.blocks) if x.state == ACTIVE]
        chosen = self._fill(best, active_ids, preds, row, S)
        completed = []
        for i in active_ids:
            x = best.blocks[i]
            x.masks = len(self._masked(best, x))
            if x.masks == 0:
                completed.append(i)

        n_before = len(state.branches)
        base = best.copy(n_before, True)
        spawned: list[PBranch] = []
        if self.lookahead:
            spawned = self._lookaheads(best, active_ids, chosen, preds, row, S, n_before)
        spawned.append(base)
        for nb in spawned:
            for i in caching:
                if i < len(nb.blocks):
                    nb.blocks[i].state = IN_CACHE
            live_ids = [i for i, x in enumerate(nb.blocks) if x.state == ACTIVE]
            for i in live_ids:
                x = nb.blocks[i]
                x.masks = len(self._masked(nb, x))
            for i in live_ids:
                if i in completed and nb.blocks[i].masks == 0 and all(x.state != ACTIVE for x in nb.blocks[:i]):
                    nb.blocks[i].state = TO_CACHE
        state.branches = [b for b in state.branches if not b.active] + spawned
        state.canvas = base.tokens.clone()
        if self.cfg.trace:
            state.trace.append(Step(sorted(chosen), winner, scores))
        return row

    def output(self, state: PublishedState) -> list[int]:
        """All generated blocks of the branch that finished first (no cut at EOS), as the published code returns."""
        if state.output_branch is None:  # stopped by the round cap: the filled prefix of the current base
            ids = state.canvas[state.prompt_len:]
            holes = (ids == self.spec.mask_id).nonzero()
            return ids[: int(holes[0])].tolist() if len(holes) else ids.tolist()
        return state.output_branch.tokens[state.prompt_len:].tolist()

    # -- the published bookkeeping ------------------------------------------------------------------
    def _grow(self, b: PBranch) -> None:
        """Add one block if the branch may have more, saw no EOS, and its last block is decoded enough."""
        last = b.blocks[-1]
        progress = (last.total - last.masks) / last.total if last.total > 0 else 1.0
        if len(b.blocks) - 1 < self.max_blocks and not b.eos and progress >= self.cfg.add_threshold:
            start = len(b.tokens)
            size = self.cfg.block_size
            b.tokens = torch.cat([b.tokens, torch.full((size,), self.spec.mask_id, dtype=torch.int64)])
            b.blocks.append(PBlock(start, start + size, size, ACTIVE, False))

    def _mark_complete(self, b: PBranch) -> None:
        """Block i+1 is fully activated once block i is ``complete_threshold`` decoded (sticky)."""
        for i, x in enumerate(b.blocks[:-1]):
            if x.total > 0 and (x.total - x.masks) / x.total >= self.cfg.complete_threshold:
                b.blocks[i + 1].complete = True

    def _shared_prefix_end(self, live: list[PBranch]) -> int:
        def leading(b: PBranch) -> int:
            n = 0
            for x in b.blocks:
                if x.state not in (IN_CACHE, TO_CACHE) or x.masks != 0:
                    break
                n += 1
            return n

        n = min(leading(b) for b in live)
        return live[0].blocks[n - 1].end if n else live[0].blocks[0].end

    def _masked(self, b: PBranch, x: PBlock) -> list[int]:
        """Absolute positions of block x that are still masked in branch b."""
        return (x.start + (b.tokens[x.start:x.end] == self.spec.mask_id).nonzero()[:, 0]).tolist()

    def _pred(self, preds: Predictions, row: int, positions: list[int], S: int):
        idx = torch.tensor([p - S for p in positions], dtype=torch.int64)
        return preds.tokens[row, idx], preds.prob[row, idx], preds.conf[row, idx]

    def _score(self, b: PBranch, preds: Predictions, row: int, S: int) -> float:
        """Mean confidence over every masked position of the branch after the shared prefix (1.0 if none)."""
        if len(b.tokens) <= S:
            return 1.0
        masked = (S + (b.tokens[S:] == self.spec.mask_id).nonzero()[:, 0]).tolist()
        if not masked:
            return 1.0
        conf = self._pred(preds, row, masked, S)[2]
        return conf.item() if len(conf) == 1 else torch.sort(conf).values.mean().item()

    def _fill(self, best: PBranch, active_ids: list[int], preds: Predictions, row: int, S: int) -> set[int]:
        """The winner's fill: per active block, positions whose max probability passes τ; if none and the block
        is fully activated, the single most confident one. Returns the positions written."""
        writes: dict[int, int] = {}
        for i in active_ids:
            x = best.blocks[i]
            masked = [p for p in self._masked(best, x) if S <= p < len(best.tokens)]
            if not masked:
                continue
            tok, prob, conf = self._pred(preds, row, masked, S)
            picks = (prob > self.cfg.tau).nonzero()[:, 0]
            if len(picks) == 0 and x.complete:
                picks = torch.topk(conf, 1).indices
            for j in picks.tolist():
                writes[masked[j]] = int(tok[j])
                if int(tok[j]) == self.eos:
                    best.eos = True
        for p, t in writes.items():
            best.tokens[p] = t
        return set(writes)

    def _lookaheads(self, best: PBranch, active_ids: list[int], chosen: set[int], preds: Predictions, row: int,
                    S: int, n_before: int) -> list[PBranch]:
        """k copies of the winner, each with one more position filled: the k most confident masked positions of
        its active blocks (pre-fill predictions). None available: the winner itself goes on as a base."""
        cands = []
        for i in active_ids:
            x = best.blocks[i]
            for p in self._masked(best, x):
                if p not in chosen and S <= p < len(best.tokens):
                    cands.append(p)
        if not cands:
            best.is_base = True
            return [best]
        tok, _, conf = self._pred(preds, row, cands, S)
        ranked = sorted(range(len(cands)), key=lambda j: -conf[j].item())  # stable: ties keep position order
        out = []
        for j in ranked[: self.lookahead]:
            nb = best.copy(n_before + len(out), False)
            nb.tokens[cands[j]] = int(tok[j])
            if int(tok[j]) == self.eos:
                nb.eos = True
            out.append(nb)
        return out

    def _finish(self, state: PublishedState) -> None:
        done = [b for b in state.branches if not b.active and b.finished_at is not None]
        state.output_branch = min(done, key=lambda b: b.finished_at)  # first in list order on ties
        state.canvas = state.output_branch.tokens.clone()
        state.done = True
