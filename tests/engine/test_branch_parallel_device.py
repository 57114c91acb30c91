"""Branch Parallel on the device path (engine/device.py's update behind runner/group.py), 2 and 3 gloo ranks
(k = 1 over 3 ranks: a rank holds no row of that request): each rank computes its rows, the predictions are
gathered in global order, every rank runs the same update, winners' windows travel from their owners; token for
token equal to one process, with the consistency check on."""

import pytest

from lopa import RunnerConfig, generate_many, load_model
from lopa.config import decode_config

PROMPTS = [[5, 6, 7, 8], [9, 3, 4, 12, 2, 7], [11, 4], [3, 3, 8, 1, 9]]


@pytest.fixture(scope="module", params=[2, 3])
def bp(tiny_dream_dir, request):
    model = load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64", branch_parallel=request.param,
                                                           bp_check=True, bp_timeout_s=60, device_step=True,
                                                           max_num_seqs=3))
    yield model
    model.close()


def test_device_path_over_two_ranks_equals_one_process(bp, tiny_dream_dir):
    one = load_model(tiny_dream_dir, runner=RunnerConfig(device="cpu", dtype="float64", device_step=False,
                                                         max_num_seqs=3))
    configs = [decode_config(None, "dream", strategy="lopa", k=k, base=base, gen_length=24, block_size=8, tau=0.5,
                             **extra)
               for k, base, extra in ((3, "d2f", {}), (1, "threshold", {"attention": "block_causal"}), (0, "d2f", {}),
                                      (7, "d2f", {"branch_confidence": "segment", "k_policy": "text"}))]
    want = generate_many(one, PROMPTS, configs)
    got = generate_many(bp, PROMPTS, configs)
    assert [(r.token_ids, r.stats.decode_forwards) for r in got] == [(r.token_ids, r.stats.decode_forwards)
                                                                      for r in want]
    c = bp.engine.counters
    assert c.device_steps == c.decode_steps > 0
    assert bp.engine.bp.gathers > 0 and bp.engine.bp.broadcasts > 0 and bp.engine.bp.checks > 0
    assert bp.engine.bp.kv_max_diff == 0.0
