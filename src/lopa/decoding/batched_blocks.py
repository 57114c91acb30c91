"""The block-diffusion rules of the device iteration: `sdar` and `fast_dllm_v2` (and `lopa` over them) for every
slot whose ``family`` is one of them, with no per-request Python (decoding/batched.py calls them as hooks).

decoding/block_diffusion.py is the specification; each function vectorizes the host rule cited beside it:

    verify(...)   verify_lookahead: a lookahead scores -inf unless the anchor row predicts its drafted token
    fill(...)     the fill rule in the active region only (every mask with p > tau, else the most confident
                  one), after pred_ok is cleared past the current block
    propose(...)  stop rules, the current block and active region, the commit end (leading complete blocks),
                  the lookahead candidates, score_span "next_region"'s carried region

Blocks are aligned at absolute position 0 (block b = [b*S, min((b+1)*S, T))). Every function works on a bounded
span of each slot row: positions base + j, j < J, base = the slot's committed length (at the step's start for
``fill``, after it for ``propose``). J = W + 2*S (the pending window's width plus two blocks; the caller passes the
step's largest) covers everything a step touches: a position is only ever filled inside a window, so the first
mask at or after the committed length lies at most at the window's end, the new current block ends at most one
block past it and the next region one more block past that. Positions are taken modulo the slot width Tc with
J <= Tc, so the span never aliases itself and positions past the canvas (t >= T, inert here) fall on positions
before the span, which are written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .slots import BIG, FAMILIES, NO_EOS, Rows, Slots

FAST = FAMILIES.index("fast_dllm_v2")


@dataclass
class Layout:
    """Where a slot's span sits in its block layout. [n, J] per position, [n] per slot."""

    t: torch.Tensor  # [n, J] absolute positions base + j
    idx: torch.Tensor  # [n, J] their columns in the slot rows (t mod Tc)
    masked: torch.Tensor  # [n, J] a mask of the canvas (t < T)
    cur_start: torch.Tensor  # [n] the current block (BlockDiffusionStrategy.current): BIG when none
    cur_end: torch.Tensor  # [n]
    first: torch.Tensor  # [n] fast_dllm_v2: the current block's first token is pending (first_token_pending)
    rs: torch.Tensor  # [n] the active region [rs, re) (BlockDiffusionStrategy.active / FastDLLMv2Strategy.active)
    re: torch.Tensor  # [n]


def layout(st: Slots, n: int, mask_id: int, base: torch.Tensor, J: int) -> Layout:
    """The span [base, base + J) of every slot and its current block / active region, the search for the current
    block starting at the slot's committed length (``cached``: it is block-aligned, every block before it done)."""
    v = Rows(st, n)
    J = min(J, st.width)
    t = base[:, None] + torch.arange(J, device=base.device)[None]  # [n, J]
    idx = t % st.width
    P, bs = v.prompt_len, v.block_size.clamp(min=1)
    T = P + v.gen_length
    masked = (st.canvas[:n].gather(1, idx) == mask_id) & (t < T[:, None])
    from_ = v.cached // bs * bs
    q = torch.where(masked & (t >= from_[:, None]), t, BIG).amin(1)  # the first mask left: in the current block
    cur_start = q // bs * bs
    cur_end = torch.minimum(cur_start + bs, T)
    fast, sub = v.family == FAST, v.sub_block.clamp(min=1)
    first = fast & (cur_start >= P) & (q == cur_start)
    sub_start = cur_start + (q - cur_start) // sub * sub  # the first sub-block with a mask: the one holding q
    rs = torch.where(fast & ~first, sub_start, cur_start)
    re = torch.where(first, cur_start + 1, torch.where(fast, torch.minimum(sub_start + sub, cur_end), cur_end))
    none = q >= BIG
    return Layout(t, idx, masked, torch.where(none, BIG, cur_start), torch.where(none, BIG, cur_end), first & ~none,
                  torch.where(none, 0, rs), torch.where(none, 0, re))


def verify(st: Slots, n: int, score: torch.Tensor, preds: torch.Tensor, look: torch.Tensor) -> torch.Tensor:
    """BlockDiffusionStrategy.branch_scores under verify_lookahead: score [n, R] -> the same with -inf for each
    lookahead whose drafted token (pred_tok at its position, before this accept) the anchor row's prediction
    there (query look - cached of row 0) does not equal. look [n, R]: each row's lookahead position (-1: none)."""
    v = Rows(st, n)
    on = (v.family > 0) & (v.verify == 1)
    pos = look[:, 1:]  # [n, R - 1]
    col = (pos - v.cached[:, None]).clamp(0, preds.shape[1] - 1)
    anchor = preds[..., 0].gather(1, col).long()
    drafted = st.pred_tok[:n].gather(1, pos.clamp(min=0))
    veto = on[:, None] & (pos >= 0) & (anchor != drafted)
    anchor_row = torch.zeros(n, 1, dtype=torch.bool, device=veto.device)
    return score.masked_fill(torch.cat([anchor_row, veto], 1), float("-inf"))


def fill(st: Slots, n: int, mask_id: int, J: int) -> torch.Tensor:
    """BlockDiffusionStrategy.fill with blocks.fill_block, after apply_row's update (``cached`` already counts the
    step's ``commit``; the span starts where the step's window did). Returns positions filled [n] (0 for the
    other slots)."""
    v = Rows(st, n)
    lay = layout(st, n, mask_id, v.cached - v.commit, J)
    bd = (v.family > 0)[:, None]
    t, idx = lay.t, lay.idx
    ok = st.pred_ok[:n].gather(1, idx) & ~(bd & (t >= lay.cur_end[:, None]))  # made while the block had a mask
    st.pred_ok[:n].scatter_(1, idx, ok)
    open_ = bd & lay.masked & ok & (t >= lay.rs[:, None]) & (t < lay.re[:, None])
    prob, conf = st.pred_prob[:n].gather(1, idx), st.pred_conf[:n].gather(1, idx)
    tau = v.tau.to(prob.dtype)[:, None]
    passing = open_ & (prob > tau)  # strict >, in the predictions' dtype
    conf_open = torch.where(open_, conf, float("-inf"))
    best = conf_open.amax(1, keepdim=True)
    cand = open_ & (conf_open == best) & ~passing.any(1, keepdim=True)
    lowest = torch.where(cand, t, BIG).amin(1, keepdim=True)  # argmax's first maximum: the lowest position
    chosen = passing | (cand & (t == lowest))
    canvas = st.canvas[:n].gather(1, idx)
    st.canvas[:n].scatter_(1, idx, torch.where(chosen, st.pred_tok[:n].gather(1, idx), canvas))
    return chosen.sum(1)


def _stopped(st: Slots, n: int, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """WindowStrategy.stopped with the families' finished(): no mask in [P, stop_end), stop_end = SDAR: the end of
    the block holding the first EOS, Fast-dLLM v2: the first EOS (T without one). -> done, capped [n]."""
    v = Rows(st, n)
    P, bs, eos = v.prompt_len, v.block_size.clamp(min=1), v.eos_at
    T = P + v.gen_length
    block_end = torch.minimum((eos.clamp(max=BIG) // bs + 1) * bs, T)
    stop_end = torch.where(eos == NO_EOS, T, torch.where(v.family == FAST, eos, block_end))
    first = torch.where(lay.masked & (lay.t >= P[:, None]), lay.t, BIG).amin(1)
    finished = first >= stop_end
    capped = ~finished & (v.rounds >= v.max_rounds)
    return finished | capped, capped


def propose(st: Slots, n: int, mask_id: int, J: int, budget) -> None:
    """BlockDiffusionStrategy.propose after accept, for the block-diffusion slots (the others keep what
    batched.propose wrote): stopped, commit end = the current block's start, window end (the current block; its
    first position while Fast-dLLM v2's first token is pending), the scored set (the active region's masks), the
    lookaheads (conf desc, position asc; ``budget(count, ranked conf [n, kc], width)`` = batched._budget), and
    under score_span "next_region" with K > 1 the next region carried as masks and scored (carry_next_region)."""
    v = Rows(st, n)
    bd = v.family > 0
    lo = v.cached
    lay = layout(st, n, mask_id, lo, J)
    t, idx = lay.t, lay.idx
    done, capped = _stopped(st, n, lay)
    hi = torch.where(lay.first, lay.cur_start + 1, lay.cur_end)
    scored = lay.masked & (t >= lay.rs[:, None]) & (t < lay.re[:, None])
    cands = scored & st.pred_ok[:n].gather(1, idx)
    key = torch.where(cands, st.pred_conf[:n].gather(1, idx), float("-inf"))
    kc = st.look.shape[1]
    key = torch.nn.functional.pad(key, (0, max(0, kc - key.shape[1])), value=float("-inf"))
    ranked = key.sort(dim=1, descending=True, stable=True)
    nlook = budget(torch.minimum(v.k, cands.sum(1)), ranked.values[:, :kc], hi - lo)
    first_k = torch.arange(kc, device=lo.device)[None] < nlook[:, None]
    look = torch.where(first_k, lo[:, None] + ranked.indices[:, :kc], -1)
    K = 1 + nlook
    width = torch.where(v.family == FAST, v.sub_block, v.block_size)
    T = v.prompt_len + v.gen_length
    nxt = torch.minimum(lay.re + width, T)  # next_region: [re, nxt)
    carry = (v.next_span == 1) & (K > 1) & (nxt > lay.re)
    hi = torch.where(carry, torch.maximum(hi, nxt), hi)
    scored |= carry[:, None] & lay.masked & (t >= lay.re[:, None]) & (t < nxt[:, None])
    st.scored[:n].scatter_(1, idx, torch.where(bd[:, None], scored, st.scored[:n].gather(1, idx)))
    st.look[:n] = torch.where(bd[:, None], look, st.look[:n])
    live = (~done).long()
    for name, value in (("width", (hi - lo) * live), ("rows", K * live), ("commit", (lay.cur_start - lo) * live),
                        ("done", done.long()), ("capped", capped.long())):
        v.set(name, torch.where(bd, value, getattr(v, name)))
