"""decoding/batched.py (and batched_blocks.py) against the host strategies, model-free: an oracle with coarse
confidences (ties everywhere: between branches, lookahead candidates, fallback positions; block progress exactly
at τ_add / τ_act) drives many requests at once through the slot rows and each alone through WindowStrategy
(threshold, d2f, sdar, fast_dllm_v2 and lopa over each)."""

import itertools

import torch

from lopa.config import DecodeConfig
from lopa.decoding import batched, make_strategy
from lopa.decoding.base import Predictions, answer_ids
from lopa.decoding.slots import DEVICE_SCORES, I, Slots

from .toy import EOS, MASK, SPEC

LEVELS = torch.tensor([0.25, 0.5, 0.75, 1.0])
ROW_BUDGET = 40  # DecodeState.row_budget before every propose (k_policy "load")


def oracle(row: torch.Tensor, start: int, cols: torch.Tensor, seed: int):
    """Per column: a token, its probability and confidence from (position, masks left in the row, the token
    before it): deterministic, coarse, sometimes EOS."""
    pos = start + cols
    left = int((row == MASK).sum())
    before = torch.where(cols > 0, row[(cols - 1).clamp(min=0)], 7)
    h = (pos * 31 + left * 17 + before * 13 + seed * 7) % 97
    tokens = torch.where(h % 23 == 0, EOS, 10 + h % 50)
    prob = LEVELS[h % 4].double()
    conf = LEVELS[(h // 4) % 4].double()
    return tokens, prob, conf


def predict(batch, seed: int) -> Predictions:
    rows = [oracle(row, batch.start, batch.logit_cols, seed) for row in batch.tokens]
    return Predictions(*(torch.stack([r[i] for r in rows]) for i in range(3)))


def host_run(cfg: DecodeConfig, prompt: list[int], seed: int):
    strategy = make_strategy(cfg, SPEC)
    state = strategy.start(prompt)
    winners = []
    while (batch := (setattr(state, "row_budget", ROW_BUDGET), strategy.propose(state))[1]) is not None:
        row = strategy.accept(state, batch, predict(batch, seed))
        if not batch.prefill:
            winners.append(row)
    return strategy.output(state), state.rounds, winners, state.hit_round_cap, state.canvas.tolist()


def device_run(cfgs: list[DecodeConfig], prompts: list[list[int]], seeds: list[int], pad: int = 3):
    """Every request at once on slot rows ``pad`` positions wider than the longest canvas; the forward is the
    oracle over each query row's columns. Also returns how many masks after an EOS the update left to store."""
    n = len(cfgs)
    strategies = [make_strategy(c, SPEC) for c in cfgs]
    states = [s.start(p) for s, p in zip(strategies, prompts)]
    width = max(len(s.canvas) for s in states) + pad
    st = Slots.empty(n, width, max(8, max(c.k for c in cfgs)), torch.device("cpu"), torch.float64)
    for b, (strategy, state) in enumerate(zip(strategies, states)):
        state.row_budget = ROW_BUDGET
        batch = strategy.propose(state)
        while batch.prefill:  # on the host (Fast-dLLM v2's may predict the first token; a short SDAR prompt has none)
            strategy.accept(state, batch, predict(batch, seeds[b]))
            batch = strategy.propose(state)
        st.load(b, strategy, state, batch, DEVICE_SCORES.index(cfgs[b].branch_confidence))
    eos = torch.tensor(SPEC.eos_ids)
    results: dict[int, tuple] = {}
    winners = [[] for _ in range(n)]
    lazy = [0]  # masks after an EOS that the update left for Slots.store to settle
    scores = tuple(sorted({c.branch_confidence for c in cfgs}))
    while len(results) < n:
        ints = st.ints[:n]
        K, W, lo = ints[:, I["rows"]], ints[:, I["width"]], ints[:, I["cached"]]
        Qb, Wm, R = int((K * W).max()), int(W.max()), int(K.max())
        bd = ints[:, I["family"]] > 0  # the block-diffusion rules' span: W + 2 * block size
        span = int(torch.where(bd, W + 2 * ints[:, I["block_size"]], 0).max())
        tokens, col, branch, _ = batched.queries(st, n, Qb, MASK)
        preds = torch.zeros(n, Qb, 3, dtype=torch.float64)
        for b in range(n):
            for r in range(int(K[b])):
                q = slice(r * int(W[b]), (r + 1) * int(W[b]))
                assert (branch[b, q] == r).all() and torch.equal(col[b, q], torch.arange(int(W[b])))
                out = oracle(tokens[b, q], int(lo[b]), col[b, q], seeds[b])
                preds[b, q] = torch.stack([out[0].double(), out[1], out[2]], -1)
        live = [b for b in range(n) if b not in results]
        winner = batched.accept(st, n, preds, max(Wm, 1), max(R, 1), scores, MASK, eos, span)
        batched.propose(st, n, MASK, torch.tensor([ROW_BUDGET]), max(Wm, 1), span)
        ready = batched.answer_ready(st, n, MASK, max(Wm, 1), span)
        for b in live:
            winners[b].append(int(winner[b]))
            T, P = len(states[b].canvas), states[b].prompt_len
            assert ready[b] == len(answer_ids(st.canvas_of(b, T, SPEC), P, SPEC))  # streaming's settled length
            if st.ints[b, I["done"]]:
                lazy[0] += int((st.canvas[b, :T] != st.canvas_of(b, T, SPEC)).sum())
                st.store(b, strategies[b], states[b])
                results[b] = (strategies[b].output(states[b]), states[b].rounds, winners[b], states[b].hit_round_cap,
                              states[b].canvas.tolist())
    return [results[b] for b in range(n)], lazy[0]


def configs():
    """Every base, score, window attention, k in {0, 1, 3, 7}, k_policy, thresholds on the progress grid."""
    out = []
    for i, (strategy, score, k) in enumerate(itertools.product(("threshold", "d2f", "lopa-d2f", "lopa-threshold"),
                                                                 DEVICE_SCORES, (0, 1, 3, 7))):
        if not strategy.startswith("lopa") and (k or score != "mean"):
            continue
        name, _, base = strategy.partition("-")
        out.append(DecodeConfig(strategy=name, base=base or "d2f", k=k, branch_confidence=score,
                                k_policy=("fixed", "text", "load")[i // 3 % 3],
                                gen_length=(12, 16, 10)[i % 3], block_size=(4, 8, 3)[i % 3],
                                tau=(0.5, 0.75, 0.25)[i % 3],
                                add_threshold=(0.25, 0.5, 0.0)[i % 3], complete_threshold=(0.5, 0.75, 1.0)[i % 3],
                                attention=(None, "full", "block_causal")[i % 3], branch_m=(2, 3, 8)[i % 3],
                                max_rounds=None if i % 5 else 3))
    for score in DEVICE_SCORES:  # wide windows: "lowest" averages more than one position, "segment" slides
        out.append(DecodeConfig(strategy="lopa", base="threshold", k=3, branch_confidence=score, gen_length=32,
                                block_size=32, tau=0.75, branch_m=5))
    return out


def test_slot_rows_decode_as_the_host_strategies():
    cfgs = configs()
    prompts = [[1 + (i * 7 + j) % 40 for j in range(2 + i % 5)] for i in range(len(cfgs))]
    seeds = list(range(len(cfgs)))
    want = [host_run(c, p, s) for c, p, s in zip(cfgs, prompts, seeds)]
    # the oracle reaches the round cap, EOS, and lookahead winners past the first
    assert any(w[3] for w in want) and any(EOS in w[0] for w in want) and any(max(w[2], default=0) > 1 for w in want)
    assert device_run(cfgs, prompts, seeds)[0] == want
    half = len(cfgs) // 2  # other neighbours, other slots
    assert device_run(cfgs[half:], prompts[half:], seeds[half:])[0] == want[half:]


def test_wide_slots_update_over_the_span():
    """Slots far wider than the canvases (as after the warm-up): the update runs over each step's span
    (batched.Geometry), and what it leaves beyond it (masks after an EOS, older windows' flags) is read back as
    the host holds it: the same tokens, forwards, winners and round caps as the host strategies."""
    long = [DecodeConfig(strategy=s, base="d2f", k=k, gen_length=200, block_size=bs, tau=tau, add_threshold=0.25,
                         complete_threshold=0.5)  # EOS early; blocks of one position; windows filled at once
            for s, k, bs, tau in (("d2f", 0, 4, 0.5), ("lopa", 3, 4, 0.5), ("lopa", 1, 4, 0.5), ("d2f", 0, 1, 0.5),
                                  ("lopa", 2, 1, 0.25), ("d2f", 0, 3, 0.25))]
    cfgs = configs() + long
    prompts = [[1 + (i * 7 + j) % 40 for j in range(2 + i % 5)] for i in range(len(cfgs))]
    seeds = list(range(len(cfgs)))
    want = [host_run(c, p, s) for c, p, s in zip(cfgs, prompts, seeds)]
    assert all(len(w[0]) < 100 for w in want[-len(long):])
    got, lazy = device_run(cfgs, prompts, seeds, pad=300)
    assert got == want and lazy > 0
    for i in range(len(cfgs) - len(long), len(cfgs)):  # alone: a grown block starts where accept's span ends
        assert device_run(cfgs[i:i + 1], prompts[i:i + 1], seeds[i:i + 1], pad=300)[0] == want[i:i + 1]


def block_configs():
    """sdar (fixed steps: tau 1.0; dynamic threshold), fast_dllm_v2 (sub-blocks, the first-token rule), lopa over
    each with k in {0, 1, 3, 7}, verify_lookahead on / off, score_span active / next_region, every k_policy."""
    out = [DecodeConfig(strategy="sdar", block_size=4, gen_length=12, tau=1.0),
           DecodeConfig(strategy="sdar", block_size=4, gen_length=14, tau=0.5),
           DecodeConfig(strategy="fast_dllm_v2", block_size=8, sub_block=4, gen_length=16, tau=0.5),
           DecodeConfig(strategy="fast_dllm_v2", block_size=4, sub_block=2, gen_length=10, tau=0.75)]
    for i, (base, k, verify, span) in enumerate(itertools.product(("sdar", "fast_dllm_v2"), (0, 1, 3, 7),
                                                                  (True, False), ("active", "next_region"))):
        out.append(DecodeConfig(strategy="lopa", base=base, k=k, verify_lookahead=verify, score_span=span,
                                block_size=(4, 8)[i % 2], sub_block=(2, 4)[i // 2 % 2], gen_length=(12, 16, 10)[i % 3],
                                tau=(0.5, 0.75, 1.0)[i % 3], k_policy=("fixed", "fixed", "text", "load")[i % 4],
                                branch_confidence=DEVICE_SCORES[i % len(DEVICE_SCORES)],
                                max_rounds=None if i % 7 else 3))
    return out


def test_block_diffusion_slot_rows_decode_as_the_host_strategies():
    """Block-diffusion slots beside window slots in one batch; prompts whose length is and is not a multiple of
    the block size (the leftover tokens in the first generated block; Fast-dLLM v2's prefill predicting the
    first token), EOS inside blocks, round caps."""
    cfgs = block_configs() + configs()[::7]
    prompts = [[1 + (i * 5 + j) % 40 for j in range((4, 8, 3, 6, 2, 5)[i % 6])] for i in range(len(cfgs))]
    seeds = [s + 100 for s in range(len(cfgs))]
    want = [host_run(c, p, s) for c, p, s in zip(cfgs, prompts, seeds)]
    bd = len(block_configs())
    assert any(EOS in w[0] for w in want[:bd]) and any(max(w[2], default=0) > 0 for w in want[:bd])
    assert device_run(cfgs, prompts, seeds)[0] == want
    assert device_run(cfgs[5::2], prompts[5::2], seeds[5::2])[0] == want[5::2]


def test_batched_scores_equal_the_host_scores():
    """Every device score, with rows and columns of padding and requested columns scattered over the window,
    equals confidence.BRANCH_SCORES on the request's own [K, C] (random data, several sizes)."""
    from lopa.decoding.confidence import BRANCH_SCORES

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        K, C, m = 1 + trial % 5, 1 + (trial * 7) % 30, 1 + trial % 9
        R, Wm = K + 2, C + 5 + trial % 4
        conf = torch.rand(K, C, generator=g, dtype=torch.float64).round(decimals=1)  # ties
        masked = torch.rand(K, C, generator=g) > 0.3
        cols = torch.zeros(Wm, dtype=torch.bool)
        cols[torch.randperm(Wm, generator=g)[:C].sort().values] = True  # where the requested columns sit
        big_conf = torch.rand(1, R, Wm, generator=g, dtype=torch.float64)  # padding holds anything
        big_mask = torch.zeros(1, R, Wm, dtype=torch.bool)
        big_conf[0, :K, cols], big_mask[0, :K, cols] = conf, masked
        for name in DEVICE_SCORES:
            params = {"tau": 0.5} if name == "count" else {"m": m} if name in ("top_m", "segment") else {}
            want = BRANCH_SCORES[name](conf, masked, None, **params).double()
            got = batched.SCORES[name](big_conf, big_mask, tau=torch.tensor([0.5], dtype=torch.float64),
                                       m=torch.tensor([m]), cols=cols[None])[0, :K]
            assert torch.allclose(got, want, rtol=1e-12, atol=0), (name, trial, got, want)
