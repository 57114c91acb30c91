"""The engine's side of a group (runner/group.py) in one process: LocalGroup records nothing, runs each step
directly and lets the engine go on only after an out-of-memory."""

import pytest
import torch

from lopa.runner.group import LocalGroup


def test_local_group_runs_the_step_directly_and_records_nothing():
    group = LocalGroup()
    group.record(("abort", "req-0"))
    assert group.step(lambda: ["out"]) == ["out"]
    with pytest.raises(ValueError, match="bad step"):
        group.step(lambda: (_ for _ in ()).throw(ValueError("bad step")))
    assert group.step(lambda: 7) == 7  # a step that raised leaves nothing behind
    assert group.counters.prepare_s == 0.0 and group.counters.control_bytes == 0


def test_local_group_survives_only_an_out_of_memory_and_follows_no_one():
    group = LocalGroup()
    assert group.survives(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    assert not group.survives(RuntimeError("a device assert"))
    with pytest.raises(RuntimeError, match="no rank 0 to follow"):
        group.follow(lambda event: None, lambda: None)
