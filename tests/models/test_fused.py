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


def test_flex_falls_back_to_compiling_batch_one_apart_when_size_oblivious_fails(monkeypatch):
    """A compiler that refuses the size-oblivious batch: one warning, then the attention compiles as before."""
    from lopa.models.attention import step_block_mask

    class Refuse:
        def __enter__(self):
            raise torch._dynamo.exc.Unsupported("this compiler cannot")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(fused, "size_oblivious", Refuse)
    ops = fused.compiled(backend="eager")
    P, branch = torch.zeros(1, dtype=torch.long), torch.zeros(1, 32, dtype=torch.long)
    mask = step_block_mask(P, branch, torch.zeros_like(branch), 256, groups=2)
    q, kv = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 256, 8)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="size-oblivious"):
        out = ops.flex(q, kv, kv, mask)
    assert out.shape == q.shape and not ops.tracing.oblivious
    torch.testing.assert_close(out, fused.EAGER.flex(q, kv, kv, block_mask=mask))


def test_compiled_flex_picks_its_kernel_tiles_by_head_dim(monkeypatch):
    """The compiled FlexAttention asks for 64 x 64 Triton tiles for heads of at most 64 and leaves torch's choice
    above; a caller's own kernel_options win. The output is the eager attention's."""
    from lopa.models.attention import step_block_mask

    seen = []
    real = fused.flex_attention

    def spy(q, k, v, block_mask=None, **kw):
        seen.append(kw.get("kernel_options"))
        return real(q, k, v, block_mask=block_mask)

    monkeypatch.setattr(fused, "flex_attention", spy)
    ops = fused.compiled(backend="eager")
    P, branch = torch.zeros(1, dtype=torch.long), torch.zeros(1, 32, dtype=torch.long)
    mask = step_block_mask(P, branch, torch.zeros_like(branch), 256, groups=2)
    with torch.inference_mode():
        for D in (64, 128):
            q, kv = torch.randn(1, 2, 64, D), torch.randn(1, 2, 256, D)
            torch.testing.assert_close(ops.flex(q, kv, kv, mask), fused.EAGER.flex(q, kv, kv, block_mask=mask))
        ops.flex(torch.randn(1, 2, 64, 64), kv[..., :64], kv[..., :64], mask, kernel_options={"BLOCK_M": 32})
    assert seen == [{"BLOCK_M": 64, "BLOCK_N": 64}, None, {"BLOCK_M": 32}]


def test_inductor_compiles_assume_their_inputs_aligned(monkeypatch):
    """compiled(): every Inductor compile assumes its inputs 16-byte aligned (fused.compile_whole: a tensor marked
    dynamic gets a symbolic storage offset, whose alignment Inductor cannot prove); the eager backend and
    aligned=False pass no options. Unmocked, torch.compile checks the option's name when it is called, so this
    torch knows it."""
    fused.compiled()  # raises on an option this torch does not know
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    fused.compiled()
    n = len(seen)
    assert n >= 5 and all(kw["options"] == {"assume_aligned_inputs": True} and kw["fullgraph"] for kw in seen)
    fused.compiled(backend="eager")
    fused.compiled(aligned=False)
    assert len(seen) == 3 * n and all(kw["options"] is None for kw in seen[n:])


def test_compiled_cache_write_puts_what_the_eager_one_does_for_every_batch():
    """Ops.rope_write compiled by Inductor (the engine's on a GPU; here its CPU code) leaves the pool exactly as the
    eager write does, at two batch sizes and two layers without recompiling (its rows are dynamic from the first
    call, the KV heads static), and touches no other position."""
    from lopa.cache import KVPool
    from lopa.models.transformer import rope as tables

    ops = fused.compiled()
    Hkv, D, cap = 2, 8, 32
    pools = [KVPool(3, Hkv, D, 4, 4, cap, "cpu", torch.float32) for _ in range(2)]
    for pool in pools:
        pool.kv.normal_(generator=torch.Generator().manual_seed(0))  # untouched positions must keep these
    equal = []
    with torch.inference_mode():
        for B, T, layer in ((3, 8, 0), (1, 4, 2)):
            write_index = torch.stack([torch.randperm(cap - 1)[:T] for _ in range(B)])
            qkv = torch.randn(B, T, 6 * Hkv * D)  # [B, T, (H + 2 Hkv) D], H = 4: k and v are strided views
            k, v = (qkv[..., i * Hkv * D:(i + 1) * Hkv * D].view(B, T, Hkv, D).transpose(1, 2) for i in (2, 3))
            cos, sin = tables(torch.arange(T)[None].expand(B, T) + 3, D, 1e4)
            stance = "fail_on_recompile" if equal else "default"  # the second shape must reuse the first's compile
            with torch.compiler.set_stance(stance):
                for pool, write in zip(pools, (ops.rope_write, fused.EAGER.rope_write)):
                    view = pool.view(1, B, cap, write_index)
                    write(*view.rows(layer), view.index, k, v, cos, sin)
            equal.append(torch.equal(pools[0].kv, pools[1].kv))
    assert equal == [True, True]
