"""threshold / d2f / lopa on hand-built oracles whose confidences are known."""

import math

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.errors import ConfigError
from lopa.decoding import make_strategy
from lopa.decoding.confidence import lowest_confidence, mean_confidence

from .toy import EOS, MASK, SPEC, drive

PROMPT = [1, 2]
P = len(PROMPT)
KEY = P + 5  # filling this position makes every other position confident


def key_oracle(row, start, cols):
    """Token 10+p at position p. Confidence 0.5 + 0.01*(p-P), the key 0.555; all 0.95 once the key is filled."""
    pos = start + cols
    key_filled = start <= KEY < start + len(row) and row[KEY - start] != MASK
    conf = 0.5 + 0.01 * (pos - P).float()
    conf[pos == KEY] = 0.555
    if key_filled:
        conf = torch.full_like(conf, 0.95)
    return 10 + pos, conf, conf


def run(oracle, **kw):
    cfg = DecodeConfig(**{**dict(gen_length=8, block_size=8, tau=0.9, trace=True), **kw})
    state, forwards, prefills = drive(make_strategy(cfg, SPEC), PROMPT, oracle)
    return state, forwards, prefills, make_strategy(cfg, SPEC).output(state)


def test_lopa_picks_the_branch_with_the_highest_mean_unfilled_confidence():
    state, forwards, prefills, out = run(key_oracle, strategy="lopa", k=3)
    assert prefills == 1 and forwards == 2 and out == [10 + p for p in range(P, P + 8)]
    first, second = state.trace
    assert first.filled == [P + 7] and first.winner == 0  # no predictions yet: anchor only, then top-1 fallback
    # round 2 rows: anchor, then lookaheads at P+6 (0.56), KEY (0.555), P+4 (0.54): the KEY branch is row 2
    assert second.winner == 2 and second.filled[0] == KEY
    assert second.scores[2] == pytest.approx(0.95) and max(second.scores[:2] + second.scores[3:]) < 0.6
    assert sorted(second.filled) == [P + i for i in range(7)]


def test_d2f_needs_more_forwards_on_the_same_oracle():
    state, forwards, _, out = run(key_oracle, strategy="d2f")
    # fallback fills P+7, P+6, then KEY; the 4th forward's predictions pass tau everywhere
    assert forwards == 4 and [s.filled for s in state.trace[:3]] == [[P + 7], [P + 6], [KEY]]
    assert len(out) == 8


@pytest.mark.parametrize("base", ["d2f", "threshold"])
def test_k0_is_the_base_strategy(base):
    ref = run(key_oracle, strategy=base)
    got = run(key_oracle, strategy="lopa", base=base, k=0)
    assert got[1:] == ref[1:] and [s.filled for s in got[0].trace] == [s.filled for s in ref[0].trace]


def test_ties_go_to_the_anchor():
    flat = lambda row, start, cols: (10 + start + cols, torch.full((len(cols),), 0.5), torch.full((len(cols),), 0.5))
    state, *_ = run(flat, strategy="lopa", k=3)
    # equal scores everywhere: the anchor wins, except where a lookahead fills the last open position
    # (nothing left to fill scores +inf, the best possible outcome)
    assert all(step.winner == 0 or step.scores[step.winner] == float("inf") for step in state.trace)
    assert sum(step.winner == 0 for step in state.trace) >= len(state.trace) - 1


def test_tau_one_fills_one_position_per_forward():
    state, forwards, _, out = run(key_oracle, strategy="threshold", tau=1.0)
    assert forwards == 8 and all(len(s.filled) == 1 for s in state.trace)


def test_eos_ends_the_answer_and_is_counted_once():
    def eos_oracle(row, start, cols):
        pos = start + cols
        tok = torch.where(pos == P + 3, torch.tensor(EOS), 10 + pos)
        return tok, torch.full((len(cols),), 0.95), torch.full((len(cols),), 0.95)

    state, forwards, _, out = run(eos_oracle, strategy="d2f", gen_length=16, block_size=4)
    assert out == [10 + P, 11 + P, 12 + P, EOS] and forwards == 1
    assert state.canvas[P + 4:].eq(EOS).all()  # positions after EOS became EOS, not counted, no new blocks
    assert len(state.blocks) == 1


def test_round_cap_stops_and_keeps_the_filled_prefix():
    state, forwards, _, out = run(key_oracle, strategy="d2f", max_rounds=2)
    assert state.hit_round_cap and forwards == 2 and out == []  # P+7 and P+6 filled, the prefix is still open


def test_d2f_block_pipeline():
    low = lambda row, start, cols: (10 + start + cols, torch.full((len(cols),), 0.3), 0.3 - 0.001 * cols.float())
    # one fully active block at a time: exactly one token per forward
    state, forwards, _, out = run(low, strategy="d2f", gen_length=16, block_size=4, add_threshold=0.5,
                                  complete_threshold=1.0)
    assert forwards == 16 and len(out) == 16 and len(state.blocks) == 4
    # the next block is fully active once its predecessor is a quarter done: two blocks make progress at once
    _, fewer, _, out2 = run(low, strategy="d2f", gen_length=16, block_size=4, add_threshold=0.25,
                            complete_threshold=0.25)
    assert fewer < 16 and len(out2) == 16


def test_block_causal_window_ids_and_commit():
    from lopa.decoding.d2f import D2FStrategy

    cfg = DecodeConfig(strategy="d2f", gen_length=8, block_size=4, tau=0.9, add_threshold=0.0)
    strat = D2FStrategy(cfg, SPEC)
    state = strat.start(PROMPT)
    prefill = strat.propose(state)
    assert prefill.prefill and prefill.commit == P
    strat.accept(state, prefill, None)
    batch = strat.propose(state)  # add_threshold 0: the second block is added at once
    assert batch.tokens.shape == (1, 8) and batch.block_ids.tolist() == [0] * 4 + [1] * 4 and batch.commit == 0


def test_branch_score_functions():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.2, 0.2, 0.2]])
    masked = torch.tensor([[True, True, False, False], [False, False, False, False]])
    assert mean_confidence(conf, masked).tolist() == [pytest.approx(0.5), float("inf")]
    assert lowest_confidence(conf, masked).tolist()[0] == pytest.approx(0.1)


def test_random_order_ablation_is_seeded():
    noisy = lambda row, start, cols: (10 + start + cols, 0.5 + 0.4 * torch.rand(len(cols)), 0.5 + 0.4 * torch.rand(len(cols)))
    torch.manual_seed(0)
    a, *_ = run(noisy, strategy="lopa", k=3, branch_confidence="random", seed=1, gen_length=16)
    torch.manual_seed(0)
    b, *_ = run(noisy, strategy="lopa", k=3, branch_confidence="random", seed=1, gen_length=16)
    torch.manual_seed(0)
    c, *_ = run(noisy, strategy="lopa", k=3, branch_confidence="random", seed=2, gen_length=16)
    winners = lambda s: [step.winner for step in s.trace]
    assert winners(a) == winners(b) and winners(a) != winners(c)


def test_new_branch_scores_by_hand():
    from lopa.decoding.confidence import count_above, log_confidence_sum, top_m_confidence, weakest_segment

    # row 0 the anchor (4 masked), row 1 a lookahead that filled column 3, row 2 finished
    conf = torch.tensor([[0.95, 0.2, 0.92, 0.4], [0.95, 0.3, 0.5, 0.0], [0.1, 0.1, 0.1, 0.1]])
    masked = torch.tensor([[True, True, True, True], [True, True, True, False], [False, False, False, False]])
    count = count_above(conf, masked, tau=0.9)
    assert int(count[0]) == 2 and int(count[1]) == 1 + 1 and count[2] >= 4  # lookahead: its own fill + 1 above τ
    assert count[0] - 2 == pytest.approx(0.5 * (0.95 + 0.2 + 0.92 + 0.4) / 4)  # tiebreak: half the mean
    assert top_m_confidence(conf, masked, m=2).tolist()[:2] == [pytest.approx(0.935), pytest.approx(0.725)]
    seg = weakest_segment(conf, masked, m=2)  # windows (0,1) (1,2) (2,3) over masked positions
    assert seg[0] == pytest.approx(min(0.575, 0.56, 0.66)) and seg[1] == pytest.approx(min(0.625, 0.4, 0.5))
    logs = log_confidence_sum(conf, masked)
    assert logs[1] == pytest.approx(math.log(0.95) + math.log(0.3) + math.log(0.5))
    assert all(f(conf, masked).tolist()[2] == float("inf") for f in (top_m_confidence, weakest_segment, log_confidence_sum))


@pytest.mark.parametrize("score", ["count", "top_m", "segment", "logsum"])
def test_every_branch_score_decodes_through_lopa(score):
    state, forwards, _, out = run(key_oracle, strategy="lopa", k=3, branch_confidence=score)
    assert out == [10 + p for p in range(P, P + 8)] and forwards <= 4
    assert all(len(step.fills) == len(step.scores) for step in state.trace)


def test_scores_that_read_probabilities_refuse_other_measures():
    with pytest.raises(ConfigError, match="confidence"):
        DecodeConfig(branch_confidence="count", confidence="neg_entropy")
    with pytest.raises(ConfigError, match="branch_m"):
        DecodeConfig(branch_m=0)
    with pytest.raises(ConfigError, match="k_policy"):
        DecodeConfig(k_policy="sometimes")


def test_trace_fills_are_what_each_row_would_have_filled():
    state, *_ = run(key_oracle, strategy="lopa", k=3)
    second = state.trace[1]
    # the KEY row fills itself and then every other position (all 0.95 > τ); the others nothing passes τ: the
    # top-1 fallback of the fully active block, plus their lookahead
    assert second.fills[second.winner] == len(second.filled) == 7
    assert [f for r, f in enumerate(second.fills) if r != second.winner] == [1, 2, 2]


def test_text_budget_shrinks_with_the_last_fill_and_flat_candidates():
    from lopa.decoding.budget import FILL_HALVING, Landscape, load_budget, text_budget

    steep = torch.linspace(0.8, 0.1, 10)
    assert text_budget(8, Landscape(steep, 0, 16)) == 8
    assert text_budget(8, Landscape(steep, int(FILL_HALVING), 16)) == 4
    assert text_budget(8, Landscape(steep, 100, 16)) == 1
    assert text_budget(8, Landscape(torch.full((10,), 0.5), 0, 16)) == 1  # nothing to choose between
    assert text_budget(8, Landscape(steep[:3], 0, 16)) == 3  # never more than the candidates
    assert load_budget(8, Landscape(steep, 0, 16, row_budget=64)) == 3  # 4 rows of 16 columns
    assert load_budget(8, Landscape(steep, 0, 16, row_budget=8)) == 1  # at least one lookahead
    assert load_budget(8, Landscape(steep, 0, 16)) == 8


def test_text_budget_spends_one_lookahead_when_the_candidates_are_alike():
    flat = lambda row, start, cols: (10 + start + cols, torch.full((len(cols),), 0.3), 0.3 - 0.001 * cols.float())

    def widths(policy):
        state, *_ = run(flat, strategy="lopa", k=6, k_policy=policy)
        return {len(step.scores) for step in state.trace if step.scores}

    assert widths("text") == {2} and 7 in widths("fixed")


def test_load_budget_reads_the_row_budget_from_the_state():
    cfg = DecodeConfig(strategy="lopa", k=5, gen_length=8, block_size=8, tau=0.9, k_policy="load")
    strat = make_strategy(cfg, SPEC)
    state = strat.start(PROMPT)
    strat.accept(state, strat.propose(state), None)  # prefill
    batch = strat.propose(state)
    preds = key_oracle(batch.tokens[0], batch.start, batch.logit_cols)
    from lopa.decoding.base import Predictions

    strat.accept(state, batch, Predictions(*(torch.as_tensor(x)[None] for x in preds)))
    state.row_budget = 3 * 8  # three rows of the 8-column window
    assert strat.propose(state).tokens.shape == (3, 8)
    state.row_budget = None
    assert strat.propose(state).tokens.shape[0] == 6
