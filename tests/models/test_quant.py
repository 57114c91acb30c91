"""Weight-only int8: close to the full-precision model, every decoder Linear swapped, selectable by config."""

import pytest
import torch

import lopa
from lopa.models.quant import Int8Linear, quantize_model


def test_int8_linear_error_is_small_and_weights_are_int8():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    ref = lin(x)
    assert q.qweight.dtype == torch.int8
    assert ((q(x) - ref).norm() / ref.norm()).item() < 1e-2


def test_quantized_model_matches_and_decodes(tiny_dream_dir):
    full = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    quant = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", quantize="int8"))
    layers = full.config.num_layers
    assert sum(isinstance(m, Int8Linear) for m in quant.loaded.model.modules()) == 4 * layers
    tokens = torch.randint(0, full.config.vocab_size, (1, 12))
    with torch.no_grad():
        a = full.loaded.model.logits(full.loaded.model(tokens), torch.arange(1, 12))
        b = quant.loaded.model.logits(quant.loaded.model(tokens), torch.arange(1, 12))
    assert ((a - b).norm() / a.norm()).item() < 5e-2
    res = lopa.generate(quant, "Tom has", strategy="lopa", k=2, gen_length=16, block_size=8)
    assert res.stats.decode_forwards >= 1


def test_unknown_scheme():
    with pytest.raises(lopa.ConfigError, match="quantize"):
        lopa.RunnerConfig(quantize="int4")
    with pytest.raises(ValueError):
        quantize_model(torch.nn.Module(), "int4")
