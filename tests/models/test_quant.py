"""Quantized decoder Linears (weight-only int8, W8A8 fp8): close to the full-precision model, every decoder
Linear swapped, selectable by config, bad combinations refused."""

import pytest
import torch

import lopa
from lopa.models.quant import FP8, Fp8Linear, Int8Linear, quantize_model, quantize_rows, scaled_mm_reference


def test_int8_linear_error_is_small_and_weights_are_int8():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    ref = lin(x)
    assert q.qweight.dtype == torch.int8
    assert ((q(x) - ref).norm() / ref.norm()).item() < 1e-2


def test_fp8_rows_and_linear():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different magnitude
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((6,), 448.0))  # each row uses the full range
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0)  # e4m3: 3 mantissa bits
    padded, _ = quantize_rows(x, 16)  # zero rows after the real ones (the GEMM's padded row count)
    assert padded.shape == (16, 64) and torch.equal(padded[:6].float(), q.float()) and not padded[6:].float().any()
    lin = torch.nn.Linear(64, 32)
    f = Fp8Linear(lin)
    assert f.qweight.dtype == FP8 and f.scale.shape == (1, 32)
    ref = lin(x[:, None].expand(6, 3, 64))  # leading dims kept
    got = f(x[:, None].expand(6, 3, 64))
    assert got.shape == ref.shape and ((got - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("scheme,cls,tol", [("int8", Int8Linear, 5e-2), ("fp8", Fp8Linear, 0.15)])
def test_quantized_model_matches_and_decodes(tiny_dream_dir, scheme, cls, tol):
    full = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu"))
    quant = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cpu", quantize=scheme))
    layers = full.config.num_layers
    assert sum(isinstance(m, cls) for m in quant.loaded.model.modules()) == 4 * layers
    tokens = torch.randint(0, full.config.vocab_size, (1, 12))
    with torch.no_grad():
        a = full.loaded.model.logits(full.loaded.model(tokens), torch.arange(1, 12))
        b = quant.loaded.model.logits(quant.loaded.model(tokens), torch.arange(1, 12))
    assert ((a - b).norm() / a.norm()).item() < tol
    res = lopa.generate(quant, "Tom has", strategy="lopa", k=2, gen_length=16, block_size=8)
    assert res.stats.decode_forwards >= 1


def test_fp8_refused_with_a_typed_error_where_the_gpu_cannot_run_it(monkeypatch):
    """load_model's check, with the GPU's compute capability faked (runs on a CPU machine)."""
    from lopa.api import _check_quantize

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100: no fp8
    with pytest.raises(lopa.ConfigError, match="compute capability"):
        _check_quantize("fp8", cuda, torch.bfloat16)
    _check_quantize("int8", cuda, torch.float32)  # int8 runs anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(lopa.ConfigError, match="bfloat16"):
            _check_quantize("fp8", cuda, dtype)
    _check_quantize("fp8", cuda, torch.bfloat16)
    _check_quantize("fp8", torch.device("cpu"), torch.float32)  # the reference product


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 GEMMs need a GPU")
def test_fp8_on_gpu_needs_fp8_tensor_cores_and_16_bit(tiny_dream_dir):
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(lopa.ConfigError, match="compute capability"):
            lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", quantize="fp8"))
        return
    with pytest.raises(lopa.ConfigError, match="bfloat16"):
        lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", dtype="float32", quantize="fp8"))
    model = lopa.load_model(tiny_dream_dir, runner=lopa.RunnerConfig(device="cuda", quantize="fp8"))
    assert lopa.generate(model, "Tom has", strategy="lopa", k=2, gen_length=16).stats.decode_forwards >= 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 tensor cores")
def test_reference_product_is_what_the_gpu_computes():
    torch.manual_seed(0)
    (xq, xs), (wq, ws) = quantize_rows(torch.randn(40, 256, device="cuda")), quantize_rows(torch.randn(64, 256, device="cuda"))
    bias = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    got = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t().contiguous(), bias=bias, out_dtype=torch.bfloat16)
    ref = scaled_mm_reference(xq, wq, xs, ws.t(), bias, torch.float32)
    assert ((got.float() - ref).norm() / ref.norm()).item() < 5e-3  # bf16 output rounding (2^-9) and sum order


def test_unknown_scheme():
    with pytest.raises(lopa.ConfigError, match="quantize"):
        lopa.RunnerConfig(quantize="int4")
    with pytest.raises(ValueError):
        quantize_model(torch.nn.Module(), "int4")
