"""The decoder layer's elementwise chains (RMSNorm with the residual add before it, RoPE, the K/V cache write
with k's RoPE, SiLU·up, fp8 activation quantization) as plain functions, and a fused set of them.

Run eagerly, each chain is several kernels with float32 round trips through memory: RMSNorm six, RoPE about
nine per tensor, SiLU·up two over strided halves. At Dream-7B size on an H100 those kernels cost about as much
as the non-GEMM rest of a LoPA iteration (the profile in docs/benchmarks.md). ``compiled()`` wraps the same
functions in torch.compile, which turns each chain into one generated kernel with the same arithmetic. The
runner uses it on a GPU (RunnerConfig.fuse); on a CPU the eager functions run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import mark_batch_dynamic, split_attention
from .quant import quantize_rows

try:  # FlexAttention (torch >= 2.5): the static path's attention over each slot's real key span
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - older torch: the runner keeps SDPA with an additive mask
    flex_attention = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., E] -> [..., E]: normalized in float32, cast back, then scaled (Qwen2's and LLaMA's order)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass: (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] float32. Rotate-half RoPE in float32 (float64 for a float64 model)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(dt) * cos.to(dt) + rotated.to(dt) * sin.to(dt)).to(x.dtype)


def rope_write(k_rows: torch.Tensor, v_rows: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The attention's cache write: k RoPE'd, then k and v put at their rows. k_rows / v_rows [N, D]: a layer's K and V
    of the forward's slots, flat (cache.py: CacheView.rows); index [B, T, Hkv]: each query's row there; k, v
    [B, Hkv, T, D] (k before RoPE; any strides: both are views of the fused projection). Compiled, one kernel reads
    the projection's k and v where they lie and scatters them: no RoPE'd k or contiguous v in between. The rows are
    two inputs, not one [2, N, D]: a compiled write into a view of an input copies that whole input around the
    scatter; into an input itself it scatters in place."""
    k_rows.index_put_((index,), rope(k, cos, sin).transpose(1, 2))
    v_rows.index_put_((index,), v.transpose(1, 2))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> [..., I]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rope_write: Callable[..., None]  # (k_rows, v_rows, index, k, v, cos, sin): k's RoPE and the K/V cache write
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    quantize_rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # fp8 activations (models/quant.py)
    # (q, k, v, block_mask=, enable_gqa=) -> out; eager it evaluates the mask everywhere (reference, CPU tests),
    # compiled it is one Triton kernel that skips the key tiles the block mask leaves out
    flex: Callable[..., torch.Tensor] | None = flex_attention
    # (q, k, v, block_mask) -> out: the same with the keys in chunks (models/attention.py: split_attention); compiled,
    # the repeated queries and the chunks' merge are fused around the kernel
    split: Callable[..., torch.Tensor] | None = None
    tracing: "Tracing | None" = None  # compiled(): whether calls still set up what a compile needs (settle())

    def settle(self) -> None:
        """Everything is compiled (the runner's warm-up): calls skip the compile-time configs, which cost tens of
        microseconds a call on paths that are not replayed from a CUDA graph. The marks stay."""
        if self.tracing is not None:
            self.tracing.on = False


@dataclass
class Tracing:
    on: bool = True  # calls set up what a compile needs (until the warm-up ends)
    oblivious: bool = True  # the attention compiles size-obliviously (False after a compiler refused it)


EAGER = Ops(rms_norm, add_rms_norm, rope, rope_write, silu_mul, quantize_rows, flex_attention,
            None if flex_attention is None else functools.partial(split_attention, flex_attention))


def _static_width(fn: Callable) -> Callable:
    """Call a compiled row reduction with the row width marked static. torch.compile makes a dimension
    dynamic once it has seen two sizes of it; the fp8 quantizer sees widths 3584 and 18944 (Dream-7B), and
    one generic kernel for any width ran ~5x slower than the specialized ones. The row count may still
    become dynamic, so new window shapes do not recompile."""
    def call(x: torch.Tensor, *args):
        torch._dynamo.mark_static(x, x.dim() - 1)
        return fn(x, *args)
    return call


def _rows(x: torch.Tensor) -> list[tuple[torch.Tensor, range]]:
    return [(x, range(x.dim() - 1))]


def _cache_rows(k_rows, v_rows, index, k, v) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """rope_write's rows, index and k / v [B, Hkv, T, D]: the rows and tokens vary, the KV heads and D do not."""
    return [(k_rows, (0,)), (v_rows, (0,)), (index, (0, 1)), (k, (0, 2)), (v, (0, 2))]


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> list[tuple[torch.Tensor, range]]:
    """RoPE's cos / sin, [T, D] or [B, 1, T, D]: every dim but the feature dim and the size-1 head dim."""
    return [(t, (0, 2) if t.dim() == 4 else range(t.dim() - 1)) for t in (cos, sin)]


# which dims of each chain's tensor arguments vary with the step (batch, tokens, heads): every one but the feature
# dim, except the size-1 head dim that cos / sin [B, 1, T, D] broadcast over; the cache write keeps the KV heads
# static (a model constant)
_VARYING = {
    rms_norm: lambda x, weight, eps: _rows(x),
    add_rms_norm: lambda x, delta, weight, eps: _rows(x) + _rows(delta),
    silu_mul: _rows,
    rope: lambda x, cos, sin: _rows(x) + _tables(cos, sin),
    rope_write: lambda k_rows, v_rows, index, k, v, cos, sin: (_cache_rows(k_rows, v_rows, index, k, v)
                                                               + _tables(cos, sin)),
}


def _dynamic_rows(fn: Callable, varying: Callable, tracing: Tracing) -> Callable:
    """Call a compiled elementwise chain dynamic in its rows from the first call: torch.compile would compile it
    static, then again for the second row count (and the first B = 1 apart), so a warm-up over many shapes
    compiled each chain three times or more; the feature dim stays static (its kernels are specialized on it).
    The kernels are the same dynamic ones the later shapes got before."""
    def call(*args):
        for x, dims in varying(*args):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(x, dim)
            torch._dynamo.mark_static(x, x.dim() - 1)
        if not tracing.on:
            return fn(*args)
        with size_oblivious():
            return fn(*args)
    return call


def compiled(backend: str = "inductor", aligned: bool = True) -> Ops:
    """The same functions through torch.compile (one graph each, no breaks). backend="eager" only traces.
    ``aligned``: Inductor assumes every input 16-byte aligned (compile_whole); False only for benchmarks/attention.py's
    comparison."""
    tracing = Tracing()
    compile_ = functools.partial(compile_whole, backend=backend, aligned=aligned)
    rms, add_rms, rope_, write, silu = (_dynamic_rows(compile_(f), _VARYING[f], tracing)
                                        for f in (rms_norm, add_rms_norm, rope, rope_write, silu_mul))
    quant = _static_width(compile_(quantize_rows))
    flex = split = None
    if flex_attention is not None:
        flex = _static_queries(compile_(flex_attention), tracing)
        split = _or_unfused(_static_queries(compile_(functools.partial(split_attention, flex_attention)), tracing),
                            flex)
    return Ops(rms, add_rms, rope_, write, silu, quant, flex, split, tracing)


def compile_whole(fn: Callable, backend: str = "inductor", aligned: bool = True) -> Callable:
    """torch.compile of one whole graph; under Inductor with every input assumed 16-byte aligned. A tensor marked
    dynamic gets a symbolic storage offset, and Inductor, unable to prove a symbolic offset aligned, drops the
    pointer's alignment hint: Triton then loads it in 2-byte pieces, outside its pipeline. The attention's V is
    such a tensor: a cache view past the pool's start at every call, the first included (K's first call, layer 0
    and slot 0, specializes its offset to 0; later offsets are checked at run time). Seen in the FlexAttention
    kernel Inductor generated for a batch marked dynamic (H100, torch 2.11): V's loads scalar and unpipelined,
    where the same kernel compiled static, V's offset known, kept them 16-byte and pipelined, and ran 1.2-1.5x
    faster (docs/benchmarks.md, twelfth session). Every offset lopa passes is a multiple of 8 elements; an input
    found misaligned at a call is copied first (Inductor's own check), so the assumption costs a copy at worst,
    never a wrong result."""
    options = None
    if aligned and backend == "inductor":
        from torch._inductor import config
        options = {"assume_aligned_inputs": True} if hasattr(config, "assume_aligned_inputs") else None
    return torch.compile(fn, backend=backend, fullgraph=True, options=options)


def _static_queries(fn: Callable, tracing: Tracing) -> Callable:
    """The compiled FlexAttention, specialized on the query and key lengths (a kernel compiled for dynamic lengths
    ran at about half the speed: H100, benchmarks/attention.py) and dynamic in the batch from the first call: one
    compile per query bucket serves every batch bucket (runner/graphs.py warms them all). The batch dims of q, k,
    v are marked here, those of the block mask's tensors where it is built (models/attention.py). Size-oblivious
    reasoning keeps a first call with B = 1 from specializing on 1 (torch otherwise compiles B = 1 apart)."""
    def call(q, k, v, block_mask, **kw):
        mark_batch_dynamic(q, k, v)
        kw.setdefault("kernel_options", flex_tiles(q.shape[-1]))
        if not tracing.on:
            return fn(q, k, v, block_mask=block_mask, **kw)
        with torch._dynamo.config.patch(**COMPILE_LIMITS):
            if tracing.oblivious:
                try:
                    with size_oblivious():
                        return fn(q, k, v, block_mask=block_mask, **kw)
                except torch._dynamo.exc.TorchDynamoException as err:  # a compiler that cannot: B = 1 apart
                    tracing.oblivious = False
                    warnings.warn(f"FlexAttention did not compile with size-oblivious batch sizes "
                                  f"({type(err).__name__}: {err}); B = 1 compiles apart", RuntimeWarning, stacklevel=2)
            return fn(q, k, v, block_mask=block_mask, **kw)
    return call


def _or_unfused(split: Callable, flex: Callable) -> Callable:
    """Ops.split compiled whole or, from the first call whose compile fails, with only FlexAttention compiled (the
    repeat and the merge eager around it, as before Ops.split), with a warning: a compiler that refuses the fused
    form costs speed, never the model's load. Running out of GPU memory is not a compiler's refusal: it propagates
    and leaves the fused form in place."""
    def call(q, k, v, block_mask):
        nonlocal split
        if split is not None:
            try:
                return split(q, k, v, block_mask)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler failure means: the unfused form
                warnings.warn(f"the split attention did not compile whole ({type(err).__name__}: {err}); its repeat "
                              f"and merge run unfused", RuntimeWarning, stacklevel=2)
                split = None
        return split_attention(flex, q, k, v, block_mask)
    return call


def flex_tiles(head_dim: int) -> dict | None:
    """The compiled FlexAttention's Triton tiles for a head dim: 64 queries x 64 keys for heads of at most 64
    (H100, benchmarks/attention.py: about 3x torch's default tiles at the embedded model's 4 heads over 2 of 64,
    where a step's few small tiles leave the kernel latency-bound), torch's own choice above (64 x 64 ran at half
    its speed at Dream-7B's 128)."""
    return {"BLOCK_M": 64, "BLOCK_N": 64} if head_dim <= 64 else None


@contextlib.contextmanager
def size_oblivious():
    """torch.fx.experimental._config.backed_size_oblivious on (torch >= 2.6), set and restored directly: the
    config's patch() costs ~5x more, on every call."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "backed_size_oblivious"):
        yield
        return
    before = _config.backed_size_oblivious
    _config.backed_size_oblivious = True
    try:
        yield
    finally:
        _config.backed_size_oblivious = before


# the warm-up compiles one graph per query bucket (len(QUERY_BUCKETS) at most), above dynamo's default of 8; the
# margin keeps an unexpected specialization from falling back to the eager FlexAttention (scores materialized)
COMPILE_LIMITS = {name: value for name, value in (("recompile_limit", 512), ("accumulated_recompile_limit", 4096))
           if hasattr(torch._dynamo.config, name)}


def fused_ops(device: torch.device, dtype: torch.dtype) -> Ops:
    """compiled() if it works on this device, checked on a small input; otherwise EAGER with a warning
    (torch.compile needs Triton and a C compiler on a GPU machine)."""
    try:
        ops = compiled()
        if device.type != "cuda":  # inductor's CPU FlexAttention template does not take this mask: eager there
            ops = dataclasses.replace(ops, flex=EAGER.flex, split=EAGER.split)
        with torch.inference_mode():  # the mode the runner calls it in, so the guards match
            x = torch.ones(2, 8, device=device, dtype=dtype)
            torch.testing.assert_close(ops.rms_norm(x, x[0], 1e-6), rms_norm(x, x[0], 1e-6))
        return ops
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run unfused
        warnings.warn(f"fuse: torch.compile is unavailable here ({type(err).__name__}: {err}); running unfused",
                      RuntimeWarning, stacklevel=2)
        return EAGER
