"""A hung Branch Parallel rank (stopped, alive, silent) ends the run with BranchParallelError after bp_timeout_s."""

import os
import signal
import time

import pytest

from lopa import BranchParallelError, RunnerConfig, generate, load_model

TIMEOUT_S = 4.0


def test_hung_worker_raises_typed_error_after_the_timeout(tiny_dream_dir):
    bp = load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float32", branch_parallel=2,
                                                        bp_timeout_s=TIMEOUT_S))
    try:
        (worker,) = bp.runner.group.procs
        os.kill(worker.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(BranchParallelError, match="rank 0"):
            generate(bp, [5, 6, 7, 8], strategy="lopa", k=3, gen_length=16, block_size=8)
        waited = time.monotonic() - t0
        assert worker.is_alive() and waited < TIMEOUT_S + 30  # the deadline fired; the rank never answered
    finally:
        bp.close()  # kills the stopped worker
    assert not worker.is_alive()
