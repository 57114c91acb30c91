"""predict(): measures by hand, sampling determinism, top-p, suppression; DecodeConfig validation and presets."""

import math

import pytest
import torch

from lopa import PRESETS, ConfigError, DecodeConfig, decode_config
from lopa.decoding.base import PredictSpec
from lopa.decoding.confidence import predict


def test_measures_match_hand_computation():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    p = predict(logits, PredictSpec(measure="prob"))
    assert p.tokens.item() == 0 and p.prob.item() == pytest.approx(0.7) and p.conf.item() == pytest.approx(0.7)
    e = predict(logits, PredictSpec(measure="neg_entropy"))
    assert e.conf.item() == pytest.approx(sum(q * math.log(q) for q in (0.7, 0.2, 0.1)), abs=1e-5)
    m = predict(logits, PredictSpec(measure="margin"))
    assert m.conf.item() == pytest.approx(0.5)


def test_suppressed_ids_are_never_proposed():
    logits = torch.tensor([[[5.0, 1.0, 0.0]]])
    p = predict(logits, PredictSpec(suppress_ids=(0,)))
    assert p.tokens.item() == 1 and p.prob.item() == pytest.approx(math.e / (math.e + 1))


def test_sampling_is_seeded_and_top_p_restricts():
    logits = torch.randn(4, 50, 10)
    a = predict(logits, PredictSpec(temperature=1.0), torch.Generator().manual_seed(7))
    b = predict(logits, PredictSpec(temperature=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)
    peaked = torch.tensor([[[3.0, 2.9, -5.0, -5.0]]]).expand(1, 200, 4)
    s = predict(peaked, PredictSpec(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(0))
    assert set(s.tokens.unique().tolist()) == {0}  # the nucleus holds only the top token


@pytest.mark.parametrize("field,value", [("tau", 0.0), ("tau", 1.01), ("k", -1), ("block_size", 0), ("gen_length", 0),
                                         ("top_p", 0.0), ("strategy", "x"), ("attention", "x"),
                                         ("branch_confidence", "x")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DecodeConfig(**{field: value})


def test_presets_follow_table5():
    assert PRESETS["gsm8k"].k == 14 and PRESETS["math"].block_size == 16 and PRESETS["humaneval"].tau == 0.95
    assert PRESETS["mbpp"].add_threshold == 0.3
    llada = decode_config(model_type="llada")
    assert (llada.block_size, llada.add_threshold, llada.gen_length) == (64, 0.7, 512)
    assert decode_config("math", k=3).k == 3
    with pytest.raises(ConfigError, match="preset"):
        decode_config("nope")
    with pytest.raises(ConfigError, match="unknown"):
        DecodeConfig().replace(bogus=1)
