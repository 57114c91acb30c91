"""Branch Parallel with 2 CPU ranks on the LLaDA family (float32), then the fault path: a killed worker."""

import os
import signal
import time

import pytest

from lopa import BranchParallelError, RunnerConfig, generate, load_model

TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def pair(tiny_llada_dir):
    ref = load_model(tiny_llada_dir, runner=RunnerConfig(device="cpu", dtype="float32"))
    bp = load_model(tiny_llada_dir, runner=RunnerConfig(device="cpu", dtype="float32", branch_parallel=2,
                                                        bp_check=True, bp_timeout_s=TIMEOUT_S))
    yield ref, bp
    bp.close()


@pytest.mark.parametrize("k,base", [(3, "d2f"), (2, "threshold")])
def test_llada_matches_one_process(pair, k, base):
    ref, bp = pair
    kw = dict(strategy="lopa", k=k, base=base, gen_length=24, block_size=8)
    for prompt in ([5, 6, 7, 8], [11, 4, 9]):
        assert generate(bp, prompt, **kw).token_ids == generate(ref, prompt, **kw).token_ids
    assert bp.engine.bp.broadcasts > 0 and bp.engine.bp.bytes_per_commit > 0


def test_killed_worker_raises_typed_error_within_the_timeout(pair):
    _, bp = pair
    (worker,) = bp.runner.group.procs
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(BranchParallelError, match="rank 1"):
        generate(bp, [5, 6, 7, 8], strategy="lopa", k=3, gen_length=16, block_size=8)
    assert time.monotonic() - t0 < TIMEOUT_S
    with pytest.raises(BranchParallelError, match="failed earlier"):  # the group stays failed: no silent reuse
        generate(bp, [5, 6, 7, 8], strategy="lopa", k=3, gen_length=16, block_size=8)
