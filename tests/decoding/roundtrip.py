"""Slots.load then Slots.store: a request's host state and pending batch come back exactly (engine tests use it)."""

import dataclasses

import torch

from lopa.decoding.slots import Slots


def assert_slot_round_trip(strategy, state, batch, positions: int, lookaheads: int) -> None:
    """Load the request into slot 1 of fresh slots ([2, positions] wide, ``lookaheads`` lookaheads), store it back
    into ``state``: canvas, pred_ok, the predictions where pred_ok, blocks, lengths, EOS and the pending batch
    equal what they were."""
    before = dataclasses.replace(state, canvas=state.canvas.clone(), pred_ok=state.pred_ok.clone(),
                                 pred_tok=state.pred_tok.clone(), pred_prob=state.pred_prob.clone(),
                                 pred_conf=state.pred_conf.clone(),
                                 blocks=[dataclasses.replace(b) for b in state.blocks])
    slots = Slots.empty(2, positions, lookaheads, torch.device("cpu"), state.pred_prob.dtype)
    slots.load(1, strategy, state, batch, 0)
    again = slots.store(1, strategy, state)
    ok = before.pred_ok
    assert torch.equal(state.canvas, before.canvas) and torch.equal(state.pred_ok, ok)
    for name in ("pred_tok", "pred_prob", "pred_conf"):
        assert torch.equal(getattr(state, name)[ok], getattr(before, name)[ok]), name
    assert (state.blocks, state.cached, state.rounds, state.eos_at, state.pending) == \
        (before.blocks, before.cached, before.rounds, before.eos_at, before.pending)
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.logit_cols, batch.logit_cols)
    assert (again.start, again.commit) == (batch.start, batch.commit)
    assert (again.block_ids is None) == (batch.block_ids is None)
    assert again.block_ids is None or torch.equal(again.block_ids, batch.block_ids)
