"""LoPA over SDAR's loop on a hand-built oracle: what a branch is scored over (DecodeConfig.score_span) and the
lookahead check (verify_lookahead), with confidences known.

Blocks of 4 after a 4-token prompt: block A = [4, 8), block B = [8, 12). The first forward fills 4, 5, 6 and
leaves 7 with a stale guess ``DRAFT`` (conf 0.6); once 4..6 are filled the model predicts 17 at 7 (0.7). Block
B reads well (0.95) after 17 at 7, badly (0.3) after any other token there, and so-so (0.5) while 7 is a mask.
So the second forward has one lookahead: the branch that writes DRAFT into A's last mask."""

import math

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.decoding import make_strategy
from lopa.decoding.base import ModelSpec

from .toy import EOS, MASK, drive

SPEC = ModelSpec(mask_id=MASK, eos_ids=(EOS,), max_length=64, vocab_size=100, block_size=4)
PROMPT = [1, 2, 3, 4]
WRONG, RIGHT = 50, 17


def oracle(draft):
    def predict(row, start, cols):
        at = {start + i: int(t) for i, t in enumerate(row)}
        toks, confs = [], []
        for p in (start + cols).tolist():
            if p < 7:
                tok, conf = 10 + p, 0.95
            elif p == 7:
                tok, conf = (draft, 0.6) if at.get(6, MASK) == MASK else (RIGHT, 0.7)
            else:
                seven = at.get(7, RIGHT)  # a forward without 7 in its window has it committed: filled
                tok, conf = 10 + p, 0.5 if seven == MASK else 0.95 if seven == RIGHT else 0.3
            toks.append(tok)
            confs.append(conf)
        conf = torch.tensor(confs, dtype=torch.float64)
        return torch.tensor(toks), conf, conf
    return predict


def run(draft, **kw):
    cfg = DecodeConfig(**{**dict(strategy="lopa", base="sdar", k=3, block_size=4, gen_length=8, tau=0.9,
                                 trace=True, score_span="active", verify_lookahead=False), **kw})
    strategy, shapes = make_strategy(cfg, SPEC), []  # shapes: [K, W] of each decode forward
    propose = strategy.propose

    def recorded(state):
        batch = propose(state)
        if batch is not None and not batch.prefill:
            shapes.append(tuple(batch.tokens.shape))
        return batch

    strategy.propose = recorded
    state, forwards, _ = drive(strategy, PROMPT, oracle(draft))
    return state, forwards, shapes, strategy.output(state)


def test_active_span_lets_a_branch_that_empties_its_set_win_whatever_it_wrote():
    state, forwards, shapes, out = run(WRONG)
    step = state.trace[1]
    assert step.winner == 1 and step.scores[1] == math.inf and step.filled == [7]
    assert out[7 - 4] == WRONG and shapes[:3] == [(1, 4), (2, 4), (1, 8)]  # block B only once A is complete


def test_next_region_scores_the_branch_by_the_next_block_and_keeps_the_anchor():
    state, forwards, shapes, out = run(WRONG, score_span="next_region")
    step = state.trace[1]
    assert step.scores == pytest.approx([(0.7 + 4 * 0.5) / 5, 0.3])  # A's mask and B's four; B's four alone
    assert step.winner == 0 and out == [10 + p for p in range(4, 12)]
    assert shapes == [(1, 4), (2, 8), (1, 8)]  # the branching forward carries block B ahead; then A + B (commit)


def test_next_region_reuses_the_winning_branchs_predictions_of_the_next_block():
    """The branch that completed A predicted B exactly as B's first forward would: B fills in the same step."""
    active = run(RIGHT)
    state, forwards, shapes, out = run(RIGHT, score_span="next_region")
    assert out == active[3] == [10 + p for p in range(4, 12)]
    assert state.trace[1].winner == 1 and state.trace[1].filled == [7, 8, 9, 10, 11]
    assert (forwards, active[1]) == (2, 3)


def test_verify_vetoes_a_lookahead_the_anchor_does_not_predict():
    state, _, _, out = run(WRONG, verify_lookahead=True)
    assert state.trace[1].scores[1] == -math.inf and state.trace[1].winner == 0
    assert out == [10 + p for p in range(4, 12)]
    agreed = run(RIGHT, verify_lookahead=True)[0]  # the anchor predicts the drafted 17 there: not vetoed
    assert agreed.trace[1].winner == 1 and agreed.trace[1].scores[1] == math.inf


@pytest.mark.parametrize("draft", [WRONG, RIGHT])
def test_k0_with_either_option_is_the_own_loop(draft):
    own = run(draft, strategy="sdar")
    for kw in (dict(score_span="next_region"), dict(verify_lookahead=True)):
        got = run(draft, k=0, **kw)
        assert got[1:] == own[1:] and [s.filled for s in got[0].trace] == [s.filled for s in own[0].trace]
