"""`lopa eval`'s grid of runs and its pairs, without a model."""

import pytest

from lopa.errors import ConfigError
from lopa.eval.grid import check_compare, eval_configs


def test_every_decoding_field_reaches_every_run_and_the_sweeps_multiply():
    configs, refs = eval_configs("dream", None, ["d2f", "lopa", "published"],
                                 {"k": [2, 4], "tau": [0.8], "k_policy": ["fixed", "text"], "branch_m": 3,
                                  "gen_length": 16, "seed": 5}, random_tfo=1)
    assert list(configs) == ["d2f tau=0.8", "lopa k=2 budget=fixed tau=0.8", "lopa k=2 budget=text tau=0.8",
                             "lopa k=4 budget=fixed tau=0.8", "lopa k=4 budget=text tau=0.8",
                             "published k=2 tau=0.8", "published k=4 tau=0.8", "random-tfo k=2 seed=0 tau=0.8"]
    assert all(c.gen_length == 16 and c.branch_m == 3 and c.tau == 0.8 for c in configs.values())
    assert configs["published k=2 tau=0.8"].compat == "published"
    assert configs["random-tfo k=2 seed=0 tau=0.8"].seed == 0 and configs["d2f tau=0.8"].seed == 5
    assert refs == {"lopa k=2 budget=text tau=0.8": "lopa k=2 budget=fixed tau=0.8",
                    "lopa k=4 budget=text tau=0.8": "lopa k=4 budget=fixed tau=0.8"}


def test_the_grid_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="step_rows"):
        eval_configs("dream", None, ["lopa"], {"k_policy": ["load"]}, 0, step_rows=None)
    assert eval_configs("dream", None, ["lopa"], {"k_policy": ["load"]}, 0, step_rows=64)[0]
    with pytest.raises(ConfigError, match="compat"):
        eval_configs("llada", None, ["published"], {}, 0)
    with pytest.raises(ConfigError, match="strategies"):
        eval_configs("dream", None, ["d2f", "d2f"], {}, 0)
    with pytest.raises(ConfigError, match="strategy"):
        eval_configs("dream", None, [""], {}, 0)


def test_compare_names_two_different_runs():
    assert check_compare("a,b", ["a", "b"]) == ("a", "b") and check_compare(None, ["a"]) is None
    for bad in ("a,a", "a", "a,c", "a,b,a"):
        with pytest.raises(ConfigError, match="compare"):
            check_compare(bad, ["a", "b"])


def test_block_diffusion_options_sweep_as_lopa_variants_paired_with_the_first():
    configs, refs = eval_configs("sdar", None, ["lopa"], {"base": "sdar", "block_size": 4, "k": [3],
                                                          "score_span": ["active", "next_region"],
                                                          "verify_lookahead": [True, False]}, 0)
    assert list(configs) == ["lopa k=3 span=active verify=true", "lopa k=3 span=active verify=false",
                             "lopa k=3 span=next_region verify=true", "lopa k=3 span=next_region verify=false"]
    assert [(c.score_span, c.verify_lookahead) for c in configs.values()] == [
        ("active", True), ("active", False), ("next_region", True), ("next_region", False)]
    assert set(refs.values()) == {"lopa k=3 span=active verify=true"} and len(refs) == 3


def test_a_bool_list_reads_true_and_false():
    from lopa.flags import parse_list

    assert parse_list("verify_lookahead", "true, OFF", bool) == [True, False]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_list("verify_lookahead", "true,1", bool)
    with pytest.raises(ConfigError, match="verify_lookahead: must be a comma-separated list of bool"):
        parse_list("verify_lookahead", "maybe", bool)
