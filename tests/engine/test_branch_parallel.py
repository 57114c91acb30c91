"""Branch Parallel on the CPU (gloo): 3 ranks reused across cases, token for token equal to one process.

Every case runs with the consistency check on (RunnerConfig.bp_check): after each commit every rank's
lengths, canvases and committed K/V must equal rank 0's, else BranchParallelError."""

import pytest
import torch

from lopa import RunnerConfig, generate, generate_many, load_model
from lopa.config import decode_config
from lopa.runner.group import split_rows

PROMPTS = ([5, 6, 7, 8], [9, 3, 4, 12, 2, 7])


@pytest.fixture(scope="module")
def pair(tiny_dream_dir):
    ref = load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64"))
    bp = load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64", branch_parallel=3,
                                                        bp_check=True, bp_timeout_s=60))
    yield ref, bp
    bp.close()


def test_split_rows_is_balanced_contiguous_and_replicates_single_rows():
    assert split_rows(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert split_rows(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]  # K < N: rank 2 has no rows
    assert split_rows(1, 3) == [range(0, 1)] * 3  # prefill, k = 0: replicated
    assert split_rows(1, 3, replicate=False) == [range(0, 1), range(1, 1), range(1, 1)]  # sampled rows travel


@pytest.mark.parametrize("k,base", [(0, "d2f"), (2, "d2f"), (1, "threshold"), (4, "d2f"), (7, "threshold")])
def test_matches_one_process(pair, k, base):
    ref, bp = pair
    sent = bp.engine.bp.broadcasts
    for prompt in PROMPTS:
        kw = dict(strategy="lopa", k=k, base=base, gen_length=24, block_size=8)
        a, b = generate(ref, prompt, **kw), generate(bp, prompt, **kw)
        assert b.token_ids == a.token_ids and b.stats.decode_forwards == a.stats.decode_forwards
    if k:  # K = k+1 rows spread over the ranks: winners' windows travel; k = 0 is replicated
        assert bp.engine.bp.broadcasts > sent
    assert bp.engine.bp.kv_max_diff == 0.0


def test_published_compat_matches(pair):
    ref, bp = pair
    kw = dict(strategy="lopa", k=3, compat="published", gen_length=16, block_size=8)
    assert generate(bp, PROMPTS[0], **kw).token_ids == generate(ref, PROMPTS[0], **kw).token_ids


def test_two_requests_batched_together(pair):
    ref, bp = pair
    kw = dict(strategy="lopa", k=4, gen_length=24, block_size=8)
    solo = [generate(ref, p, **kw).token_ids for p in PROMPTS]
    outs = generate_many(bp, list(PROMPTS), **kw)
    assert [o.token_ids for o in outs] == solo
    assert bp.engine.counters.requests_per_step > 1  # the two requests shared forwards


def test_sampled_requests_stay_consistent_across_ranks(pair):
    """Sampled rows are drawn by the rank that computes them (never replicated), so every rank holds the same
    draws: the check passes every step, and the same seed decodes the same tokens again."""
    _, bp = pair
    kw = dict(strategy="lopa", k=2, gen_length=16, block_size=8, temperature=0.8, seed=3)
    checks = bp.engine.bp.checks
    first, again = generate(bp, PROMPTS[0], **kw), generate(bp, PROMPTS[0], **kw)
    assert first.token_ids == again.token_ids and bp.engine.bp.checks > checks


def test_joins_and_aborts_between_steps_reach_every_rank(pair):
    """Requests joining at a later step and one aborted mid-run: rank 0's events reach the workers before the
    step they belong to, so the survivor decodes as it does alone in one process."""
    ref, bp = pair
    config = decode_config(None, ref.model_type, strategy="lopa", k=4, gen_length=24, block_size=8)
    engine = bp.engine
    a, b = engine.prepare(PROMPTS[0], config), engine.prepare(PROMPTS[1], config)
    finished = {}
    with torch.inference_mode():
        engine.add(a)
        for _ in range(2):
            engine.step()
        engine.add(b)
        engine.step()
        engine.abort(a.id)
        while engine.has_work():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    assert finished[a.id].finish_reason == "abort"
    assert finished[b.id].result.token_ids == generate(ref, PROMPTS[1], config).token_ids

