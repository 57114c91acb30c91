"""models.fused: the compiled elementwise chains trace as one graph each and compute what the eager ones do."""

import pytest
import torch

import lopa
from lopa.models import fused


def test_compiled_ops_trace_without_breaks_and_match_eager(tiny_dream_dir, tiny_llada_dir):
    for folder in (tiny_dream_dir, tiny_llada_dir):
        model = lopa.load_model(folder, runner=lopa.RunnerConfig(device="cpu"))
        assert not model.fused  # fusing is for GPUs
        net = model.loaded.model
        tokens = torch.randint(0, model.config.vocab_size - 2, (3, 11))
        with torch.inference_mode():
            ref = net(tokens)
            net.ops = fused.compiled(backend="eager")  # fullgraph=True: any graph break raises
            assert model.fused
            torch.testing.assert_close(net(tokens), ref, rtol=0, atol=0)


def test_fused_ops_fall_back_to_eager_with_a_warning(monkeypatch):
    def broken(backend="inductor"):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(fused, "compiled", broken)
    with pytest.warns(RuntimeWarning, match="no Triton here"):
        assert fused.fused_ops(torch.device("cpu"), torch.float32) is fused.EAGER


def test_compiled_fp8_quantizer_traces_whole_and_matches():
    x = torch.randn(5, 32) * 3
    q, scale = fused.compiled(backend="eager").quantize_rows(x)
    ref_q, ref_scale = fused.EAGER.quantize_rows(x)
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)
