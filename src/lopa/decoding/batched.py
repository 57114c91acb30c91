"""One iteration of threshold / d2f / lopa for every running request at once, on the slots' device rows.

The same steps as WindowStrategy (decoding/window.py), each a few tensor ops over [n, S] (each slot's span of
positions) or [n, R, Wm] (branch rows x window columns), with no per-request Python:

    queries(...)   the pending forward's rows, packed per query: tokens, col, branch, block   [n, Qb]
    accept(...)    branch scores over still-masked scored columns, the winner (first argmax: ties to the
                   lower row), the winner's row and predictions become the canvas, settle EOS, fill, settle
    propose(...)   grow a d2f block, finished / round cap, the scored set, the k most confident candidates
                   (conf desc, position asc: a stable sort), K, the commit end (leading complete blocks)

``n`` rows are slots 0..n-1 of ``Slots`` (decoding/slots.py); every function updates them in place. Host
ints the caller passes (Qb, Wm, R) only size tensors. The host strategies are the specification: every rule
here is the vectorized form of the one cited beside it, and tests/decoding/test_batched.py holds the engine's
device path to them. Block-diffusion slots (``family`` sdar / fast_dllm_v2) share queries, the branch scores,
the winner and its predictions; their own rules (verify_lookahead, fill, stop rules, the next forward's plan)
are decoding/batched_blocks.py's, called here when the step holds such slots (``span`` > 0: their bound J).

The slots are as wide as the longest canvas the context allows (8,192 positions after the warm-up), but one step
touches few of them: each function reads its slots' span (``Geometry``: S positions from the committed length,
gathered), applies the rules there and scatters the result back, so its cost follows the step's windows, not the
slot width: accept's S = Wm (the widest window), propose's 2*Wm (the window and the block d2f may grow after it,
whose size is at most W: a block grows only after a full-size last block still in the window), answer_ready's
the larger of Wm and the block-diffusion bound J. What makes the span enough: positions before the committed
length are complete and never change (and their blocks fully active); canvas and predictions change only in
the window [cached, cached + W), W <= Wm; the first EOS can only move earlier, inside the window. The one rule
whose reach is unbounded, settle_eos turning every mask after the first EOS into EOS up to P + G, is applied
over the span and lazily beyond it, where the host reads the canvas (Slots.canvas_of); no step reads a position
past the window after an EOS (no block grows then).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import batched_blocks
from .budget import FILL_HALVING, FLAT_SPREAD, K_FLOOR
from .slots import BIG, DEVICE_SCORES, NO_EOS, Rows, Slots

class Geometry:
    """The step's span of each slot and where its positions sit: positions t = s0 + j, j in [0, S) (S at most the
    slots' width), s0 = min(lo, width - S) (so the span stays inside the slot; positions before lo are committed
    and complete), in the generated region or not, and in which block. Blocks are span-relative: column i is
    block b0 + i (b0: the block holding s0; grid: block b starts at P + b*bs), [n, NB + 1] with NB = S; no
    position of the span lies in block b0 + NB, so column NB collects the positions outside every block. Blocks
    before b0 are committed: complete, and fully active (d2f activates a block at the latest in the accept that
    commits it)."""

    def __init__(self, v: Rows, S: int, lo: torch.Tensor) -> None:
        n, Tc = v.n, v.st.width
        S = min(S, Tc)
        dev = v.st.canvas.device
        self.s0 = lo.clamp(max=Tc - S)[:, None]  # [n, 1]
        self.t = self.s0 + torch.arange(S, device=dev)[None]  # [n, S] absolute positions
        # block_size >= 1: rows never loaded (bucket padding on the static path) hold zeros
        self.P, self.G, self.bs = v.prompt_len[:, None], v.gen_length[:, None], v.block_size.clamp(min=1)[:, None]
        self.T = self.P + self.G
        self.in_gen = (self.t >= self.P) & (self.t < self.T)  # [n, S]
        self.NB = S
        self.b0 = ((self.s0 - self.P) // self.bs).clamp(min=0)  # [n, 1]
        self.bi = torch.where(self.in_gen, (self.t - self.P) // self.bs - self.b0, self.NB)  # [n, S]
        self.i = torch.arange(self.NB + 1, device=dev)[None]  # [1, NB + 1]
        self.block = self.b0 + self.i  # [n, NB + 1] absolute block index
        self.size = (self.G - self.block * self.bs).clamp(min=0).minimum(self.bs)  # [n, NB + 1]
        self.n, self.Tc = n, Tc

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """[S_slots, Tc] slot rows -> [n, S] their span."""
        return x[:self.n].gather(1, self.t)

    def write(self, x: torch.Tensor, value: torch.Tensor) -> None:
        x[:self.n].scatter_(1, self.t, value)

    def read_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[S_slots, Tc] per-block slot rows (Slots.active) -> [n, NB + 1]."""
        return x[:self.n].gather(1, self.block.clamp(max=self.Tc - 1))

    def write_blocks(self, x: torch.Tensor, value: torch.Tensor, nblocks: torch.Tensor) -> None:
        """Writes the present blocks (an index < nblocks <= Tc - 1, the prompt holding a position); columns
        clamped onto index Tc - 1 write back what they read there."""
        index = self.block.clamp(max=self.Tc - 1)
        x[:self.n].scatter_(1, index, torch.where(self.present(nblocks), value, x[:self.n].gather(1, index)))

    def per_block(self, x: torch.Tensor) -> torch.Tensor:
        """[n, S] bool/int -> [n, NB + 1] sums over each block's positions in the span."""
        return torch.zeros(self.n, self.NB + 1, dtype=torch.int64, device=x.device).scatter_add_(1, self.bi, x.long())

    def present(self, nblocks: torch.Tensor) -> torch.Tensor:
        return self.block < nblocks[:, None]

    def progress(self, masked: torch.Tensor) -> torch.Tensor:
        """blocks.py progress: filled / size, in float64 as on the host (positions before the span: filled)."""
        return (self.size - self.per_block(masked)).double() / self.size.clamp(min=1).double()

    def at_block(self, x: torch.Tensor, block: torch.Tensor, before: float) -> torch.Tensor:
        """x [n, NB + 1] at absolute block ``block`` [n]; ``before`` where it lies before the span."""
        rel = block - self.b0[:, 0]
        return torch.where(rel >= 0, x.gather(1, rel.clamp(0, self.NB)[:, None])[:, 0], before)


@dataclass
class Span:
    """A step's span of the slot rows a rule reads and writes ([n, S]; active [n, NB + 1])."""

    canvas: torch.Tensor
    pred_tok: torch.Tensor
    pred_prob: torch.Tensor
    pred_conf: torch.Tensor
    pred_ok: torch.Tensor
    active: torch.Tensor

    @staticmethod
    def read(st: Slots, geo: Geometry) -> "Span":
        return Span(*(geo.read(x) for x in (st.canvas, st.pred_tok, st.pred_prob, st.pred_conf, st.pred_ok)),
                    geo.read_blocks(st.active))

    def write(self, st: Slots, geo: Geometry, nblocks: torch.Tensor) -> None:
        for name in ("canvas", "pred_tok", "pred_prob", "pred_conf", "pred_ok"):
            geo.write(getattr(st, name), getattr(self, name))
        geo.write_blocks(st.active, self.active, nblocks)


def _first(flags: torch.Tensor, none: int) -> torch.Tensor:
    """Index of the first True per row, or ``none``."""
    return torch.where(flags.any(1), flags.long().argmax(1), none)


def settle_eos(v: Rows, geo: Geometry, x: Span, eos: torch.Tensor, mask_id: int) -> None:
    """base.settle_eos over the span: the canvas changes only in the window, so the first EOS is the earlier of
    eos_at and the span's first; masks after it become EOS (not in a block-diffusion slot: masks stay). Past the
    span the rule is applied lazily by whoever reads the canvas there (Slots.canvas_of): no step reads a
    position after eos_at outside the window (a block grows only while there is no EOS)."""
    is_eos = (x.canvas[..., None] == eos).any(-1) & geo.in_gen  # [n, S]
    at = torch.where(is_eos.any(1), geo.t.gather(1, is_eos.long().argmax(1)[:, None])[:, 0], NO_EOS)
    at = torch.minimum(at, v.eos_at)
    tail = (geo.t > at[:, None]) & (x.canvas == mask_id) & (geo.t < geo.T) & (v.family == 0)[:, None]
    x.canvas = torch.where(tail, eos[0], x.canvas)
    v.set("eos_at", at)


def activate(v: Rows, geo: Geometry, masked: torch.Tensor, rows: torch.Tensor, active: torch.Tensor) -> None:
    """d2f.activate for the slots in ``rows`` [n] bool: a present block whose predecessor is >= τ_act filled
    becomes fully active (the predecessor of the span's first block is committed: filled)."""
    prog = geo.progress(masked)
    prev = torch.zeros_like(prog, dtype=torch.bool)
    prev[:, 1:] = prog[:, :-1] >= v.tau_act[:, None]
    prev[:, 0] = (geo.b0[:, 0] > 0) & (v.tau_act <= 1.0)
    active |= rows[:, None] & geo.present(v.nblocks) & prev


def fill(v: Rows, geo: Geometry, x: Span, mask_id: int) -> torch.Tensor:
    """threshold.fill / d2f.fill with blocks.fill_block for every fillable block; returns positions filled [n]."""
    n, d2f = v.n, v.d2f.bool()
    masked = (x.canvas == mask_id) & geo.in_gen
    activate(v, geo, masked, d2f, x.active)  # d2f: from the state the predictions were made on
    present = geo.present(v.nblocks)
    incomplete = present & (geo.per_block(masked) > 0)
    current = _first(incomplete[:, :geo.NB], geo.NB)  # threshold: the first incomplete block (earlier: complete)
    fillable = torch.where(d2f[:, None], present, geo.i == current[:, None])
    fillable[:, -1] = False  # column NB (no position); -1 keeps a compiled update from specializing on NB
    fillable &= (v.family == 0)[:, None]  # block-diffusion slots: batched_blocks.fill
    fallback = ~d2f[:, None] | x.active  # threshold blocks are always fully active (column NB: no position)
    open_ = masked & x.pred_ok & fillable.gather(1, geo.bi)
    prob, conf = x.pred_prob, x.pred_conf
    passing = open_ & (prob > v.tau.to(prob.dtype)[:, None])  # strict >, in the predictions' dtype
    top1 = (geo.per_block(passing) == 0) & (geo.per_block(open_) > 0) & fallback  # [n, NB + 1]
    conf_open = torch.where(open_, conf, float("-inf"))
    best = torch.full((n, geo.NB + 1), float("-inf"), dtype=conf.dtype, device=conf.device)
    best = best.scatter_reduce(1, geo.bi, conf_open, "amax")
    cand = open_ & (conf_open == best.gather(1, geo.bi)) & top1.gather(1, geo.bi)
    lowest = torch.full((n, geo.NB + 1), BIG, dtype=torch.int64, device=conf.device)
    lowest = lowest.scatter_reduce(1, geo.bi, torch.where(cand, geo.t, BIG), "amin")  # ties: the lowest position
    chosen = passing | (cand & (geo.t == lowest.gather(1, geo.bi)))
    x.canvas = torch.where(chosen, x.pred_tok, x.canvas)
    return chosen.sum(1)


# -- branch scores (confidence.BRANCH_SCORES) over [n, R, Wm] with padding --------------------------------------
def _mean(conf, masked):
    count = masked.sum(-1)
    total = torch.where(masked, conf, torch.zeros_like(conf)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("inf")))


def _count(conf, masked, tau, **_):
    ahead = masked[:, :1].sum(-1) - masked.sum(-1)
    passing = (masked & (conf > tau.to(conf.dtype)[:, None, None])).sum(-1)
    return (ahead + passing).to(conf.dtype) + 0.5 * _mean(conf, masked).clamp(max=1.0)


def _top_m(conf, masked, m, **_):
    top = torch.where(masked, conf, float("-inf")).sort(-1, descending=True).values
    j = torch.arange(conf.shape[-1], device=conf.device)
    keep = (j < m[:, None, None]) & (top > float("-inf"))
    return _mean(top, keep)


def _logsum(conf, masked, **_):
    logs = torch.where(masked, torch.log(conf.clamp(min=1e-10)), torch.zeros_like(conf))
    return torch.where(masked.any(-1), logs.sum(-1), torch.full_like(logs[..., 0], float("inf")))


def _lowest(conf, masked, **_):
    count = masked.sum(-1)
    low = (count.double() * 0.1).floor().long().clamp(min=1)  # max(1, int(numel * 0.1))
    ordered = torch.where(masked, conf, float("inf")).sort(-1).values
    keep = torch.arange(conf.shape[-1], device=conf.device) < low[..., None]
    mean = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(-1) / low
    # the host collects Python floats into a float32 tensor
    return torch.where(count > 0, mean.float(), float("inf")).to(conf.dtype)


def _segment(conf, masked, m, cols, **_):
    """weakest_segment over the requested columns (``cols`` [n, Wm]: the window's anchor-masked columns),
    compacted left so that segments run over consecutive requested columns as on the host."""
    n, R, Wm = conf.shape
    C = cols.sum(-1)
    at = torch.where(cols, cols.long().cumsum(-1) - 1, Wm)[:, None].expand(n, R, Wm)
    def packed(x):
        return torch.zeros(n, R, Wm + 1, dtype=x.dtype, device=x.device).scatter_(2, at, x)[..., :Wm]

    c_conf, c_mask = packed(torch.where(masked, conf, torch.zeros_like(conf))), packed(masked.to(conf.dtype))
    zero = torch.zeros(n, R, 1, dtype=conf.dtype, device=conf.device)
    total, count = torch.cat([zero, c_conf.cumsum(-1)], -1), torch.cat([zero, c_mask.cumsum(-1)], -1)
    w = torch.minimum(m, C)
    j = torch.arange(Wm, device=conf.device)
    end = (j + w[:, None]).clamp(max=Wm)[:, None].expand(n, R, Wm)
    seg_total, seg_count = total.gather(2, end) - total[..., :Wm], count.gather(2, end) - count[..., :Wm]
    seg = torch.where(seg_count > 0, seg_total / seg_count.clamp(min=1), torch.full_like(seg_total, float("inf")))
    seg = torch.where((j <= (C - w)[:, None])[:, None], seg, float("inf"))
    return seg.min(-1).values


SCORES = {"mean": lambda conf, masked, **_: _mean(conf, masked), "lowest": _lowest, "count": _count,
          "top_m": _top_m, "segment": _segment, "logsum": _logsum}
assert tuple(SCORES) == DEVICE_SCORES


# -- the iteration ------------------------------------------------------------------------------------------------
def _look_rows(st: Slots, n: int) -> torch.Tensor:
    """[n, kc + 1] the lookahead position of each row (row 0, the anchor: -1)."""
    return torch.cat([torch.full((n, 1), -1, dtype=torch.int64, device=st.look.device), st.look[:n]], 1)


def queries(st: Slots, n: int, Qb: int, mask_id: int,
            rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The pending forward of every slot as runner/step.py's per-query fields [n, Qb]: row r column c ->
    query r*W + c; row r >= 1 is the anchor with its lookahead position filled with its predicted token.
    ``rows`` (Branch Parallel: runner/group.py, local_rows): (first, count) [n] of the rows this rank computes,
    numbered 0.. locally; None: every row."""
    v = Rows(st, n)
    W, K, lo = v.width[:, None], v.rows[:, None], v.cached[:, None]
    q = torch.arange(Qb, device=st.canvas.device)[None]
    local, c = q // W.clamp(min=1), q % W.clamp(min=1)
    first, count = (torch.zeros_like(K), K) if rows is None else (rows[0][:, None], rows[1][:, None])
    valid = local < count
    r = first + local
    pos = (lo + c).clamp(max=st.width - 1)
    look = _look_rows(st, n).gather(1, r.clamp(max=st.look.shape[1]))
    tokens = torch.where(valid & (pos == look), st.pred_tok[:n].gather(1, pos), st.canvas[:n].gather(1, pos))
    tokens = torch.where(valid, tokens, mask_id)
    bs = v.block_size.clamp(min=1)[:, None]
    origin = torch.where(v.family > 0, 0, v.prompt_len)[:, None]  # block diffusion: blocks aligned at position 0
    block = torch.where(valid & v.causal.bool()[:, None], (pos - origin) // bs, 0)
    return tokens, torch.where(valid, c, 0), torch.where(valid, local, -1), block


def accept(st: Slots, n: int, preds: torch.Tensor, Wm: int, R: int, scores: tuple[str, ...], mask_id: int,
           eos: torch.Tensor, span: int = 0) -> torch.Tensor:
    """window.accept + apply_row for every slot: preds [n, Qb, 3] (token, prob, conf per query), Wm >= every
    slot's window width (the span). Returns the winners [n]; cached, rounds, canvas, predictions, pred_lo,
    eos_at, active, last_fill updated. ``span``: the block-diffusion slots' bound J (batched_blocks), 0 when the
    step holds none."""
    v = Rows(st, n)
    dev = st.canvas.device
    W, K, lo = v.width, v.rows, v.cached
    canvas = st.canvas[:n]
    # branch scores over [n, R, Ws]: row r, window column c. Only a slot of K >= 2 rows is scored (the winner of
    # one row is row 0), and its K*W <= Qb queries leave it at most Qb / 2 columns
    Ws = max(1, min(Wm, preds.shape[1] // 2))
    c = torch.arange(Ws, device=dev)[None]
    pos = (lo[:, None] + c).clamp(max=st.width - 1)
    cols = (canvas.gather(1, pos) == mask_id) & (c < W[:, None])  # the anchor's masked columns: logit_cols
    # [n, R] (R <= kc + 1: engine/device.py, widths) by index, not [:, :R]: a slice's size is min(R, kc + 1), a size
    # relation torch.compile would guard on and recompile for where R reaches kc + 1
    look = _look_rows(st, n).index_select(1, torch.arange(R, device=dev).clamp(max=st.look.shape[1]))
    r = torch.arange(R, device=dev)[None, :, None]
    valid = (r < K[:, None, None]) & (c < W[:, None])[:, None]
    masked = cols[:, None] & (pos[:, None] != look[..., None]) & st.scored[:n].gather(1, pos)[:, None] & valid
    q = torch.where(valid, r * W[:, None, None] + c[:, None], 0).view(n, R * Ws)
    conf = preds[..., 2].gather(1, q).view(n, R, Ws)
    score = torch.zeros(n, R, dtype=conf.dtype, device=dev)
    for name in scores:
        value = SCORES[name](conf, masked, tau=v.tau, m=v.branch_m, cols=cols)
        score = torch.where((v.score == DEVICE_SCORES.index(name))[:, None], value, score)
    score = torch.where(r[..., 0] < K[:, None], score, float("-inf"))
    if span:
        score = batched_blocks.verify(st, n, score, preds, look)
    winner = torch.where(K > 1, score.argmax(1), 0)  # the first maximum: ties go to the lower row
    # apply_row over the span: the winner's row becomes the canvas, its predictions the current ones
    geo = Geometry(v, Wm, lo)
    x = Span.read(st, geo)
    ahead = look.gather(1, winner[:, None])  # [n, 1] the winner's lookahead position (-1: the anchor)
    logit = (geo.t >= lo[:, None]) & (geo.t < (lo + W)[:, None]) & (x.canvas == mask_id)
    x.canvas = torch.where(geo.t == ahead, x.pred_tok, x.canvas)
    qt = (winner[:, None] * W[:, None] + geo.t - lo[:, None]).clamp(0, preds.shape[1] - 1)
    pred = preds.gather(1, qt[..., None].expand(-1, -1, 3))  # [n, S, 3]
    x.pred_tok = torch.where(logit, pred[..., 0].long(), x.pred_tok)
    x.pred_prob = torch.where(logit, pred[..., 1], x.pred_prob)
    x.pred_conf = torch.where(logit, pred[..., 2], x.pred_conf)
    x.pred_ok = logit
    v.set("pred_lo", lo)  # pred_ok holds nothing before the window (stale flags of older windows: Slots.store)
    v.set("cached", lo + v.commit)
    v.set("rounds", v.rounds + 1)
    settle_eos(v, geo, x, eos, mask_id)
    filled = fill(v, geo, x, mask_id)
    if span:  # the block-diffusion rules read and write the slot rows
        x.write(st, geo, v.nblocks)
        filled = filled + batched_blocks.fill(st, n, mask_id, span)
        x = Span.read(st, geo)
    settle_eos(v, geo, x, eos, mask_id)
    x.write(st, geo, v.nblocks)
    v.set("last_fill", filled + (winner > 0).long())
    return winner


def propose(st: Slots, n: int, mask_id: int, row_budget: torch.Tensor, Wm: int, span: int = 0) -> None:
    """window.propose for every slot (after accept): grow, done / capped, and the next forward's plan
    (width, rows, look, scored, commit); a finished slot gets width = rows = commit = 0. ``row_budget`` [1]:
    DecodeState.row_budget of every request of the step (k_policy "load"), -1 for None. ``Wm``: accept's; the
    span is 2*Wm positions, which holds the block d2f may grow (its size is at most W: a block grows only after
    a full-size last block still in the window). ``span``: as accept's."""
    v = Rows(st, n)
    lo = v.cached
    geo = Geometry(v, 2 * Wm, lo)
    canvas, active = geo.read(st.canvas), geo.read_blocks(st.active)
    d2f = v.d2f.bool()
    masked = (canvas == mask_id) & geo.in_gen
    # d2f.grow: one block when the last one is >= τ_add filled, none past gen_length or after an EOS
    bs = geo.bs[:, 0]
    last_end = torch.minimum(v.prompt_len + v.nblocks * bs, geo.T[:, 0])
    last_prog = geo.at_block(geo.progress(masked), v.nblocks - 1, 1.0)  # a committed last block: filled
    grow = d2f & (last_end < geo.T[:, 0]) & (v.eos_at == NO_EOS) & (last_prog >= v.tau_add)
    v.set("nblocks", v.nblocks + grow.long())
    activate(v, geo, masked, grow, active)
    geo.write_blocks(st.active, active, v.nblocks)
    # finished, round cap (positions before the span are committed: filled)
    end = torch.minimum(v.prompt_len + v.nblocks * bs, geo.T[:, 0])  # window end, inside the span
    all_filled = ~(masked & (geo.t < end[:, None])).any(1)
    done = all_filled & ((v.eos_at != NO_EOS) | (end - v.prompt_len >= v.gen_length))
    capped = ~done & (v.rounds >= v.max_rounds)
    done = done | capped
    # the scored set and the lookahead candidates (conf desc, position asc)
    present = geo.present(v.nblocks)
    incomplete = present & (geo.per_block(masked) > 0)
    current = _first(incomplete[:, :geo.NB], geo.NB)
    in_window = (geo.t >= lo[:, None]) & (geo.t < end[:, None])
    scored = masked & torch.where(d2f[:, None], in_window, geo.bi == current[:, None])
    geo.write(st.scored, scored)  # the span holds the window: older flags past it are never read
    nlook = _lookahead(st, v, geo, scored & geo.read(st.pred_ok), geo.read(st.pred_conf), end - lo, row_budget)
    # commit_end: the leading run of complete blocks after the committed prefix
    first = (lo - v.prompt_len) // bs - geo.b0[:, 0]
    stops = ~(present & ~incomplete) & (geo.i >= first[:, None])
    commit_end = torch.minimum(v.prompt_len + (geo.b0[:, 0] + _first(stops, geo.NB + 1)) * bs, geo.T[:, 0])
    live = (~done).long()
    v.set("width", (end - lo) * live)
    v.set("rows", (1 + nlook) * live)
    v.set("commit", (commit_end - lo) * live)
    v.set("done", done.long())
    v.set("capped", capped.long())
    if span:
        batched_blocks.propose(st, n, mask_id, span,
                               lambda count, conf, width: _budget(v, count, conf, width, row_budget))


def _lookahead(st: Slots, v: Rows, geo: Geometry, cands: torch.Tensor, conf: torch.Tensor, width: torch.Tensor,
               row_budget: torch.Tensor) -> torch.Tensor:
    """window.lookahead_positions: the candidates [n, S] ranked by (conf desc, position asc: a stable sort of
    the span), as many as the budget allows into ``look``; returns how many [n]."""
    kc = st.look.shape[1]
    # kc columns of non-candidates after the span, so the ranking has at least kc columns whatever S is: taking
    # its first kc needs no min(kc, S), a size relation torch.compile would guard on (and recompile when it flips)
    ranked = torch.cat([torch.where(cands, conf, float("-inf")), conf.new_full((v.n, kc), float("-inf"))], 1)
    ranked = ranked.sort(dim=1, descending=True, stable=True)
    nlook = _budget(v, torch.minimum(v.k, cands.sum(1)), ranked.values[:, :kc], width, row_budget)
    # a rank past the span is never a lookahead (nlook <= the candidates, all ranked before it): clamped to read
    order = geo.t.gather(1, ranked.indices[:, :kc].clamp(max=geo.NB - 1))
    st.look[:v.n] = torch.where(torch.arange(kc, device=conf.device)[None] < nlook[:, None], order, -1)
    return nlook


def _budget(v: Rows, n: torch.Tensor, conf: torch.Tensor, width: torch.Tensor, row_budget: torch.Tensor):
    """budget.BUDGETS per slot: n = min(k, candidates) lookaheads (fixed), or fewer (text, load); conf [n, kc]
    the candidates' confidences, most confident first."""
    last = conf.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
    spread = (conf[:, 0] - last).double()  # as float(tensor) on the host: in the predictions' dtype, then double
    decay = torch.round(v.k.double() * torch.pow(2.0, -v.last_fill.double() / FILL_HALVING)).long()  # half: even
    text = torch.where(n <= K_FLOOR, n, torch.where(spread < FLAT_SPREAD, K_FLOOR,
                                                    decay.minimum(n).clamp(min=K_FLOOR)))
    load = torch.maximum(n.clamp(max=1), torch.minimum(n, row_budget // width.clamp(min=1) - 1))
    load = torch.where(row_budget < 0, n, load)
    return torch.where(v.policy == 1, text, torch.where(v.policy == 2, load, n))


def answer_ready(st: Slots, n: int, mask_id: int, Wm: int, span: int = 0) -> torch.Tensor:
    """[n] length of base.answer_ids: up to the first EOS (inclusive), cut at the first hole. Over a span of
    max(Wm, ``span``) positions from the committed length: before it nothing is masked; no position after it
    was filled yet (windows so far end within it: accept's W <= Wm, a block-diffusion window within J), so
    the position after it, if generated, is a hole (or an EOS tail after eos_at)."""
    v = Rows(st, n)
    geo = Geometry(v, max(Wm, span), v.cached)
    P, T = v.prompt_len, geo.T[:, 0]
    stop = torch.where(v.eos_at == NO_EOS, T, v.eos_at + 1)
    after = geo.t[:, -1] + 1
    holes = (geo.read(st.canvas) == mask_id) & geo.in_gen
    hole = torch.where(holes.any(1), geo.t.gather(1, holes.long().argmax(1)[:, None])[:, 0],
                       torch.where(after < T, after, BIG))
    return torch.minimum(stop, hole) - P
