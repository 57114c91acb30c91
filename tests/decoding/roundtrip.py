"""Slots.load then Slots.store: a request's host state and pending batch come back exactly (engine tests use it)."""

import dataclasses

import torch

from lopa.decoding.slots import FIELDS, Slots


def assert_slot_round_trip(strategy, state, batch, positions: int, lookaheads: int) -> None:
    """Load the request into slot 1 of fresh slots ([2, positions] wide, ``lookaheads`` lookaheads), store it back
    into ``state``: canvas, pred_ok, the predictions where pred_ok, blocks, lengths, EOS and the pending batch
    equal what they were."""
    assert_slots_round_trip([(strategy, state, batch)], positions, lookaheads)


def assert_slots_round_trip(requests: list, positions: int, lookaheads: int) -> None:
    """The same for several requests (strategy, state, batch) at once: Slots.load_many writes them into the last
    rows of fresh slots in reverse order (one more row than requests), leaving every field as loading them one at a
    time does, and Slots.store_many brings every request back exactly."""
    befores = [dataclasses.replace(state, canvas=state.canvas.clone(), pred_ok=state.pred_ok.clone(),
                                   pred_tok=state.pred_tok.clone(), pred_prob=state.pred_prob.clone(),
                                   pred_conf=state.pred_conf.clone(),
                                   blocks=[dataclasses.replace(b) for b in state.blocks])
               for _, state, _ in requests]
    n, dtype = len(requests), requests[0][1].pred_prob.dtype
    where = list(range(n, 0, -1))  # slots n..1: rows land where their index says, row 0 stays empty
    slots = Slots.empty(n + 1, positions, lookaheads, torch.device("cpu"), dtype)
    slots.load_many(where, [(strategy, state, batch, 0) for strategy, state, batch in requests])
    alone = Slots.empty(n + 1, positions, lookaheads, torch.device("cpu"), dtype)
    for slot, (strategy, state, batch) in zip(where, requests):
        alone.load(slot, strategy, state, batch, 0)
    assert all(torch.equal(getattr(slots, name), getattr(alone, name)) for name in FIELDS)
    batches = slots.store_many(where, [r[0] for r in requests], [r[1] for r in requests])
    for (_, state, batch), before, again in zip(requests, befores, batches):
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
