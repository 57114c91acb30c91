"""A model-free driver for strategies: an oracle maps a branch row to predictions, so confidences are known."""

from __future__ import annotations

import torch

from lopa.decoding.base import ModelSpec, Predictions

MASK, EOS = 99, 98
SPEC = ModelSpec(mask_id=MASK, eos_ids=(EOS,), max_length=256, vocab_size=100)


def drive(strategy, prompt, oracle):
    """Run strategy like the runner does; oracle(row [W], start, cols [C]) -> (tokens, prob, conf), each [C]."""
    state = strategy.start(prompt)
    cached, forwards, prefills = 0, 0, 0
    while (batch := strategy.propose(state)) is not None:
        assert batch.start == cached
        rows = [oracle(row, batch.start, batch.logit_cols) for row in batch.tokens]
        preds = Predictions(*(torch.stack([torch.as_tensor(r[i]) for r in rows]) for i in range(3)))
        strategy.accept(state, batch, preds)
        cached += batch.commit
        if batch.prefill:
            prefills += 1
        else:
            forwards += 1
    return state, forwards, prefills
