"""Branch Parallel's NCCL path on one GPU: a one-rank BranchGroup (NCCL all_gather of the static path's packed
predictions on the device, NCCL broadcast of the winners' windows, the consistency check) decodes the same
tokens as the single-process LocalGroup. Skipped without CUDA; also runs as a script (the device machine)."""

import tempfile

import pytest
import torch

from lopa import RunnerConfig, generate
from lopa.api import FolderSource, build_model
from lopa.runner import launch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_one_rank_nccl_group_matches_local(tiny_dream_dir):
    runner = RunnerConfig(device="cuda", dtype="float32", fuse=False)
    ref = build_model(FolderSource(tiny_dream_dir), runner)
    group = launch.start(1, torch.device("cuda"), 60.0, "broadcast", True, None)
    bp = build_model(FolderSource(tiny_dream_dir), runner, group)
    try:
        assert group.dist.get_backend() == "nccl" and bp.runner.graphs is not None
        for k in (0, 3, 7):
            kw = dict(strategy="lopa", k=k, gen_length=32, block_size=8)
            for prompt in ([5, 6, 7, 8], [9, 3, 4, 12, 2, 7]):
                assert generate(bp, prompt, **kw).token_ids == generate(ref, prompt, **kw).token_ids
        c = bp.engine.bp
        print("one-rank NCCL group:", c.as_dict())
        assert c.gathers > 0 and c.broadcasts > 0 and c.checks > 0 and c.kv_max_diff == 0.0
    finally:
        bp.close()


if __name__ == "__main__":
    from lopa.models.tiny import write_tiny_checkpoint

    test_one_rank_nccl_group_matches_local(write_tiny_checkpoint(tempfile.mkdtemp() + "/tiny", model_type="dream"))
    print("PASSED")
