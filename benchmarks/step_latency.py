"""Time one full LoPA iteration at Dream-7B / LLaDA-8B (or SDAR-8B / Fast-dLLM-v2-7B) shape, against
transformers, against the roofline.

One iteration, through lopa's own runner (VARIANTS: eager; CUDA graphs, runner/graphs.py; CUDA graphs with
the fused kernels the engine uses by default, models/fused.py; the same with fp8 decoder Linears,
models/quant.py, with and without the GEMM row padding) = forward of K = k+1 branches x W window columns
over a cached P-token prefix, logits, confidences (lopa.decoding.confidence.predict), branch scores (Eq. 2),
the winner's selection and its KV commit. In the same run, the same iteration the way users can do it today
with `transformers` (Qwen2 with a bidirectional 4-D mask, SDPA): the k+1 branches one after another over the
prefix cache (as the published LoPA code does), and batched. Also measured in the same run: the device's
bf16 (and fp8) matmul rate and copy bandwidth, from which the roofline of each case is computed.

    PYTHONPATH=src python3 benchmarks/step_latency.py --out results/      # GPU: every variant
    PYTHONPATH=src python3 benchmarks/step_latency.py --variants graphs+fused,graphs+fused-fp8 --out results/
    PYTHONPATH=src python3 benchmarks/step_latency.py --profile 10:32:512 --out results/  # kernel tables
    PYTHONPATH=src python3 benchmarks/step_latency.py --tiny --out /tmp/x  # CPU smoke test
    PYTHONPATH=src python3 benchmarks/step_latency.py --shapes sdar-8b,fast-dllm-v2-7b --ks 0,3,7 --prefixes 512 \
        --variants graphs+fused --out results/block_diffusion/

Block-diffusion shapes (sdar-8b, fast-dllm-v2-7b) time their own window instead of --windows: block-causal,
the active block last; SDAR's W = 8 is a finished block (committed by this forward: the folded commit) plus
the active block of 4, Fast-dLLM v2's W = 32 its block. Each such shape also decodes --fold-tokens tokens
through the engine (random weights, the model's own loop) with the folded commit and with one extra forward
per finished block, and reports the forwards and decode seconds the fold saves per 100 tokens.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lopa.config import DecodeConfig
from lopa.decoding.base import ForwardBatch, ModelSpec, PredictSpec
from lopa.decoding.confidence import mean_confidence, predict
from lopa.models.config import ModelConfig
from lopa.models.fused import EAGER, fused_ops
from lopa.models import quant
from lopa.models.quant import quantize_model, quantize_rows
from lopa.engine import Engine
from lopa.models.transformer import Transformer
from lopa.runner.model_runner import ModelRunner
from lopa.runner.step import Commit, StepItem

SHAPES = {
    "dream-7b": dict(model_type="dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                     mask_token_id=151666, eos_token_id=151643),
    "llada-8b": dict(model_type="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32,
                     num_heads=32, num_kv_heads=32, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     mask_token_id=126336, eos_token_id=126081),
    # JetLM/SDAR-8B-Chat (Qwen3-8B layout) and Efficient-Large-Model/Fast_dLLM_v2_7B (Qwen2.5-7B layout)
    "sdar-8b": dict(model_type="sdar", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                    num_heads=32, num_kv_heads=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                    mask_token_id=151669, eos_token_id=151643, block_size=4, explicit_head_dim=128),
    "fast-dllm-v2-7b": dict(model_type="fast_dllm_v2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                            max_position_embeddings=32768, mask_token_id=151665, eos_token_id=151645, block_size=32),
    # JetLM/SDAR-1.7B-Chat (Qwen3-1.7B layout): a small model's point between the embedded model and the 7-8B ones
    "sdar-1.7b": dict(model_type="sdar", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
                      num_heads=16, num_kv_heads=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                      mask_token_id=151669, eos_token_id=151643, block_size=4, explicit_head_dim=128),
    "tiny-sdar": dict(model_type="sdar", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                      mask_token_id=511, eos_token_id=510, block_size=4),
    "tiny-fast-dllm-v2": dict(model_type="fast_dllm_v2", vocab_size=512, hidden_size=64, intermediate_size=128,
                              num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                              max_position_embeddings=4096, mask_token_id=511, eos_token_id=510, block_size=8),
    "tiny": dict(model_type="dream", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096, mask_token_id=511,
                 eos_token_id=510),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=3, reps=10) -> float:
    """Median seconds of fn() over reps, after warmup (events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_ms(device):
    """fn -> its median ms: CUDA-graph replays on a GPU (gemm_rows.median_ms, as the engine runs kernels), wall
    time on a CPU (timed)."""
    if device.type == "cuda":
        from gemm_rows import median_ms
        return median_ms
    return lambda fn: timed(fn, device) * 1e3


def measure_device(device, dtype) -> dict:
    """Peak matmul rate on random data and copy bandwidth (bytes read + written), measured here."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, warmup=3, reps=10)
    flops = 2 * n**3 / t
    size = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.randn(size // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, warmup=3, reps=10)
    peak = {"matmul_flops": flops, "copy_bytes_per_s": 2 * src.numel() * 2 / t}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):  # fp8 tensor cores
        (a8, sa), (b8, sb) = quantize_rows(a), quantize_rows(b)
        t = timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.t().contiguous(), out_dtype=dtype),
                  device, warmup=3, reps=10)
        peak["fp8_matmul_flops"] = 2 * n**3 / t
    return peak


def costs(cfg: ModelConfig, K: int, W: int, P: int) -> dict:
    """One iteration's work: FLOPs of the decoder Linears and of the rest (lm_head over the window,
    attention), and the minimum bytes: all weights read once (decoder Linears counted apart, for fp8) and
    the prefix KV read once. Embedding lookups are not FLOPs."""
    E, L, H, Hkv, D, I, V = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    per_layer = E * (H + 2 * Hkv) * D + H * D * E + 3 * E * I
    n = K * W
    return {"linear_flops": 2 * n * L * per_layer, "other_flops": 2 * n * E * V + L * 4 * n * (P + W) * H * D,
            "linear_params": L * per_layer, "other_bytes": 2 * E * V * 2 + L * 2 * Hkv * D * (P + n) * 2}


def roofline(c: dict, peak: dict, fp8: bool = False) -> tuple[float, str]:
    """(seconds, bound): max(compute time, memory time) at the measured rates; fp8: the decoder Linears at the
    fp8 matmul rate and one byte per weight."""
    rate = peak["fp8_matmul_flops"] if fp8 else peak["matmul_flops"]
    compute = c["linear_flops"] / rate + c["other_flops"] / peak["matmul_flops"]
    memory = (c["linear_params"] * (1 if fp8 else 2) + c["other_bytes"]) / peak["copy_bytes_per_s"]
    return max(compute, memory), "compute" if compute > memory else "memory"


PADDED_ROWS = quant.ROW_MULTIPLE  # the engine's fp8 GEMM row padding
VARIANTS = {  # name -> (static path with CUDA graphs; fused kernels; decoder Linears quantized)
    "eager": (False, False, None),
    "graphs": (True, False, None),
    "graphs+fused": (True, True, None),  # the engine's default on a GPU
    "graphs+fused, fp8": (True, True, "fp8"),  # RunnerConfig(quantize="fp8")
    "graphs+fused, fp8 unpadded": (True, True, "fp8"),  # the same with the GEMM rows not padded
}


def cli_name(variant: str) -> str:
    """A VARIANTS name as --variants spells it: "graphs+fused, fp8 unpadded" -> "graphs+fused-fp8-unpadded"."""
    return variant.replace(", ", "-").replace(" ", "-")


def fp8_copy(model: Transformer, device, dtype) -> Transformer:
    """The same weights with fp8 decoder Linears and the fused activation quantizer, as load_model builds it."""
    fp8 = copy.deepcopy(model)
    quantize_model(fp8, "fp8", fused_ops(device, dtype).quantize_rows)
    return fp8


def lopa_iteration(model, cfg, K, W, P, device, dtype, variant: str = "eager"):
    """A closure running one LoPA iteration through lopa's model runner (see VARIANTS: eager, or the static
    path with CUDA graphs, optionally with the fused kernels as load_model sets them up on a GPU). It returns
    the window's final hidden states [K, W, E] (to compare variants).

    The prefix stays fixed: after the winner's commit the slot's length is rolled back each time."""
    spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
    graphs, fuse, _ = VARIANTS[variant]
    ops = fused_ops(device, dtype) if fuse else EAGER  # set on the model by each step (shared model)
    row_multiple = 1 if "unpadded" in variant else PADDED_ROWS  # fp8 GEMM rows, read when a graph is captured
    runner = ModelRunner(model, spec, device, dtype, static=graphs, fuse=fuse)
    runner.reserve(1, P + K * W + 256)  # room for the prefix and every branch's window
    torch.manual_seed(P + K + W)  # the same prefix and window for every variant
    with torch.inference_mode():
        prefix = torch.randint(0, cfg.vocab_size - 2, (1, P))
        model.ops = ops
        runner.execute([StepItem(0, ForwardBatch(prefix, 0, torch.empty(0, dtype=torch.long), commit=P, prefill=True),
                                 PredictSpec())])
        runner.commit([Commit(0, 0, 0, P)])
    tokens = torch.randint(0, cfg.vocab_size - 2, (K, W))
    tokens[:, W // 2:] = cfg.mask_token_id
    batch = ForwardBatch(tokens, P, torch.arange(W // 4, W), commit=W // 4)  # predictions for the ¾ still open
    if cfg.block_size:  # block diffusion: block-causal; the last block is active, the ones before it finished
        B = cfg.block_size
        batch = ForwardBatch(tokens, P, torch.arange(max(W - B, W // 2), W), commit=W - B,
                             block_ids=torch.arange(W) // B)
    item = StepItem(0, batch, PredictSpec(suppress_ids=(cfg.mask_token_id,)))

    @torch.inference_mode()
    def step():
        model.ops = ops  # closures of one model share it: each sets its own
        quant.ROW_MULTIPLE = row_multiple
        (preds,) = runner.execute([item])
        hidden = runner.hidden[0, :K * W].view(K, W, -1)
        still = tokens[:, batch.logit_cols] == cfg.mask_token_id
        winner = int(torch.argmax(mean_confidence(preds.conf, still)))
        runner.commit([Commit(0, 0, winner, batch.commit)])
        runner.pool.lengths[0] = P  # roll back so every repetition sees the same prefix
        return hidden
    step.runner = runner
    return step


def block_window(cfg: ModelConfig) -> int:
    """A block-diffusion model's denoising window: SDAR's active block with the finished one before it (the
    folded commit), Fast-dLLM v2's block."""
    return 2 * cfg.block_size if cfg.model_type == "sdar" else cfg.block_size


def fold_savings(model, cfg: ModelConfig, device, dtype, tokens: int, prompt_len: int = 64) -> dict:
    """Decode ``tokens`` tokens through the engine (the model's own loop: SDAR one token a step, Fast-dLLM v2
    tau 0.9 in sub-blocks of 8) with the folded commit and with one extra forward per finished block; the
    decode forwards and seconds of each, per 100 generated tokens."""
    spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size,
                     cfg.block_size)
    runner = ModelRunner(model, spec, device, dtype, static=device.type == "cuda")
    engine = Engine(runner, spec, 1)
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size - 2, (prompt_len,)).tolist()
    loop = dict(strategy="sdar", tau=1.0) if cfg.model_type == "sdar" else \
        dict(strategy="fast_dllm_v2", tau=0.9, sub_block=min(8, cfg.block_size))
    out = {}
    for fold in (True, False):
        config = DecodeConfig(**loop, block_size=cfg.block_size, gen_length=tokens, fold_commit=fold)
        with torch.inference_mode():
            engine.generate([engine.prepare(prompt, config)])  # warm-up (graph capture)
            (run,) = engine.generate([engine.prepare(prompt, config)])
        s = run.stats
        per = 100 / max(1, s.generated_tokens)
        out["fold" if fold else "extra"] = dict(decode_forwards=s.decode_forwards, generated=s.generated_tokens,
                                                decode_s=s.decode_s, forwards_per_100=s.decode_forwards * per,
                                                decode_s_per_100=s.decode_s * per)
    fold, extra = out["fold"], out["extra"]
    return dict(fold_tokens=tokens, fold=fold, extra=extra,
                forwards_saved_per_100=extra["forwards_per_100"] - fold["forwards_per_100"],
                decode_s_saved_per_100=extra["decode_s_per_100"] - fold["decode_s_per_100"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def profile_case(cfg: ModelConfig, k: int, W: int, P: int, device, dtype, out: Path, variants: list[str]) -> None:
    """Kernel-level breakdown of one iteration (eager and graphs): where the time above the roofline goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    report = []
    fp8_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    for name, (graphs, _, scheme) in VARIANTS.items():
        if cli_name(name) not in variants or (scheme == "fp8" and not fp8_ok):
            continue
        net = fp8_copy(model, device, dtype) if scheme == "fp8" else model
        step = lopa_iteration(net, cfg, k + 1, W, P, device, dtype, name)
        wall = timed(step, device, warmup=3, reps=10)
        with profile(activities=acts) as prof:
            for _ in range(5):
                step()
            sync(device)
        table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                          row_limit=30, max_name_column_width=70)
        replay = ""
        if graphs and device.type == "cuda":  # the captured graph alone: the GPU's share of the iteration
            (st,) = step.runner.graphs.statics.values()
            replay = f" (graph replay alone {timed(st.graph.replay, device, warmup=3, reps=10) * 1e3:.2f} ms)"
        report.append(f"## {name}: k={k} W={W} P={P}, median {wall * 1e3:.2f} ms per iteration{replay}; "
                      f"the table sums 5 iterations\n\n{table}\n")
        print(report[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text("\n".join(report))


def hf_model(cfg: ModelConfig, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                     max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(hc).to(dtype).eval()
    return model


def hf_iteration(model, cfg, K, W, P, device, dtype, batched: bool):
    """The same iteration with transformers: per-branch prefix caches (sequential) or one expanded batch."""
    from transformers import DynamicCache

    with torch.inference_mode():
        prefix = torch.randint(0, cfg.vocab_size - 2, (1, P), device=device)
        out = model(prefix, use_cache=True)
        layers = [(lay.keys, lay.values) for lay in out.past_key_values.layers] if hasattr(out.past_key_values, "layers") \
            else list(out.past_key_values.to_legacy_cache())
    tokens = torch.randint(0, cfg.vocab_size - 2, (K, W), device=device)
    tokens[:, W // 2:] = cfg.mask_token_id
    pos = torch.arange(P, P + W, device=device)
    spec = PredictSpec(suppress_ids=(cfg.mask_token_id,))
    cols = torch.arange(W // 4, W, device=device)

    def cache_of(rows: int):
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k.expand(rows, -1, -1, -1).contiguous() if rows > 1 else k, v.expand(rows, -1, -1, -1).contiguous() if rows > 1 else v, i)
        return cache

    @torch.inference_mode()
    def step():
        if batched:
            mask = torch.zeros(K, 1, W, P + W, device=device, dtype=dtype)  # bidirectional 4-D mask
            logits = model(tokens, past_key_values=cache_of(K), attention_mask=mask, position_ids=pos[None].expand(K, -1),
                           use_cache=True).logits
            confs = predict(logits[:, cols - 1], spec).conf
        else:
            mask = torch.zeros(1, 1, W, P + W, device=device, dtype=dtype)
            confs = torch.cat([predict(model(tokens[r:r + 1], past_key_values=cache_of(1), attention_mask=mask,
                                             position_ids=pos[None], use_cache=True).logits[:, cols - 1], spec).conf
                               for r in range(K)])
        still = tokens[:, cols].cpu() == cfg.mask_token_id
        return int(torch.argmax(mean_confidence(confs, still)))
    return step


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny shape")
    ap.add_argument("--shapes", default="dream-7b,llada-8b")
    ap.add_argument("--ks", default="0,3,7,10,15")
    ap.add_argument("--windows", default="32,64")
    ap.add_argument("--prefixes", default="256,512,1024")
    ap.add_argument("--hf", default="dream-7b", help="shapes for which to time transformers too")
    ap.add_argument("--hf-cases", default="10:32:512,10:64:512", help="k:W:P cases for the transformers baselines")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default="graphs,graphs+fused,graphs+fused-fp8,graphs+fused-fp8-unpadded",
                    help="engine variants timed beside eager: graphs, graphs+fused, graphs+fused-fp8, graphs+fused-fp8-unpadded")
    ap.add_argument("--fold-tokens", type=int, default=100, help="block-diffusion shapes: tokens decoded to count "
                    "the forwards the folded commit saves (0: skip)")
    ap.add_argument("--profile", default="", help="k:W:P: instead of the grid, profile that case (first shape; "
                    "eager and CUDA-graph iterations) with torch.profiler and write the kernel table")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = args.shapes.split(",") if args.tiny and args.shapes.startswith("tiny") else \
        ["tiny"] if args.tiny else args.shapes.split(",")
    ks = [int(x) for x in args.ks.split(",")]
    windows = [int(x) for x in args.windows.split(",")]
    prefixes = [int(x) for x in args.prefixes.split(",")]
    hf_cases = [tuple(int(v) for v in c.split(":")) for c in args.hf_cases.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    peak = measure_device(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}: "
          f"{peak['matmul_flops'] / 1e12:.0f} TFLOP/s bf16 matmul, {peak['copy_bytes_per_s'] / 1e12:.2f} TB/s copy", flush=True)
    if args.profile:
        profile_case(ModelConfig(**SHAPES[shapes[0]]), *(int(v) for v in args.profile.split(":")), device, dtype, args.out,
                     ["eager", *args.variants.split(",")])
        return
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="benchmarks/step_latency.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
                peak_tflops=peak["matmul_flops"] / 1e12, copy_tbps=peak["copy_bytes_per_s"] / 1e12,
                fp8_peak_tflops=peak.get("fp8_matmul_flops", 0) / 1e12)
    rows = []  # the JSON is rewritten after every case, so a run cut short keeps what it measured
    for shape in shapes:
        cfg = ModelConfig(**SHAPES[shape])
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg).to(dtype).eval()
        hf = hf_model(cfg, device, dtype) if (shape in args.hf.split(",") or args.tiny) and cfg.model_type == "dream" else None
        want_fp8 = "graphs+fused-fp8" in args.variants and ("fp8_matmul_flops" in peak or args.tiny)
        fp8 = fp8_copy(model, device, dtype) if want_fp8 else None  # on a CPU: the reference kernel
        fold = fold_savings(model, cfg, device, dtype, args.fold_tokens) if cfg.block_size and args.fold_tokens else {}
        if fold:
            print(json.dumps(fold), flush=True)
        for P in prefixes:
            for W in [block_window(cfg)] if cfg.block_size else windows:
                for k in ks:
                    K = k + 1
                    eager = lopa_iteration(model, cfg, K, W, P, device, dtype)
                    t = timed(eager, device, reps=args.reps)
                    ref = eager()
                    c = costs(cfg, K, W, P)
                    roof, bound = roofline(c, peak)
                    row = dict(shape=shape, k=k, W=W, P=P, lopa_ms=t * 1e3, roofline_ms=roof * 1e3, x_roofline=t / roof,
                               bound=bound, **fold)
                    if device.type == "cuda" or args.tiny:
                        for name, col in (("graphs", "lopa_graph"), ("graphs+fused", "lopa_fused"),
                                          ("graphs+fused, fp8", "lopa_fp8"), ("graphs+fused, fp8 unpadded", "lopa_fp8_unpadded")):
                            if cli_name(name) not in args.variants.split(",") or ("fp8" in col and fp8 is None):
                                continue
                            step = lopa_iteration(fp8 if "fp8" in col else model, cfg, K, W, P, device, dtype, name)
                            tv = timed(step, device, reps=args.reps)
                            row.update({f"{col}_ms": tv * 1e3, f"{col}_x_roofline": tv / roof,
                                        f"{col}_rel_err": rel_err(step(), ref)})  # final hidden states vs eager bf16
                        if "lopa_fp8_unpadded_ms" in row and "lopa_fp8_ms" in row:
                            row["fp8_padding_speedup"] = row["lopa_fp8_unpadded_ms"] / row["lopa_fp8_ms"]
                        if "lopa_fp8_ms" in row and "lopa_fused_ms" in row and "fp8_matmul_flops" in peak:
                            roof8, _ = roofline(c, peak, fp8=True)
                            row.update(fp8_roofline_ms=roof8 * 1e3, fp8_x_fp8_roofline=row["lopa_fp8_ms"] / 1e3 / roof8,
                                       fp8_speedup=row["lopa_fused_ms"] / row["lopa_fp8_ms"])
                    if hf is not None and ((k, W, P) in hf_cases or args.tiny):
                        row["hf_sequential_ms"] = timed(hf_iteration(hf, cfg, K, W, P, device, dtype, False), device, 1, 3) * 1e3
                        row["hf_batched_ms"] = timed(hf_iteration(hf, cfg, K, W, P, device, dtype, True), device, 2, 5) * 1e3
                        best = row.get("lopa_fused_ms", row["lopa_ms"])  # the engine's default path
                        row["speedup_vs_hf_sequential"] = row["hf_sequential_ms"] / best
                        row["speedup_vs_hf_batched"] = row["hf_batched_ms"] / best
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    (args.out / "step_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        del model, hf, fp8
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / "step_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}; measured "
             f"{meta['peak_tflops']:.0f} TFLOP/s, {meta['copy_tbps']:.2f} TB/s", "",
             "Columns: lopa eager; CUDA graphs; CUDA graphs + fused kernels (the engine's GPU default); the bf16 "
             "roofline and graphs+fused as a multiple of it; the same engine with fp8 decoder Linears "
             "(--quantize fp8), its speedup over bf16 and its multiple of the fp8 roofline (decoder Linears at the "
             f"measured fp8 rate, {meta['fp8_peak_tflops']:.0f} TFLOP/s), and fp8 without the GEMM row padding "
             "(models/quant.ROW_MULTIPLE = 1); transformers one branch at a time and "
             "batched, and graphs+fused's speedup over each.",
             "", "| shape | k | W | P | eager ms | graphs ms | graphs+fused ms | roofline ms | x roofline "
             "| fp8 ms | fp8 speedup | fp8 x fp8 roofline | fp8 unpadded rows ms | HF sequential ms | HF batched ms "
             "| vs seq | vs batched |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(c, fmt="{:.2f}"):
            return fmt.format(r[c]) if c in r else ""
        lines.append(f"| {r['shape']} | {r['k']} | {r['W']} | {r['P']} | {f('lopa_ms')} | {f('lopa_graph_ms')} | "
                     f"{f('lopa_fused_ms')} | {f('roofline_ms')} | {f('lopa_fused_x_roofline')} | {f('lopa_fp8_ms')} | "
                     f"{f('fp8_speedup', '{:.2f}x')} | {f('fp8_x_fp8_roofline')} | {f('lopa_fp8_unpadded_ms')} | "
                     f"{f('hf_sequential_ms', '{:.1f}')} | "
                     f"{f('hf_batched_ms', '{:.1f}')} | {f('speedup_vs_hf_sequential', '{:.2f}x')} | "
                     f"{f('speedup_vs_hf_batched', '{:.2f}x')} |")
    folds = {r["shape"]: r for r in rows if "fold" in r}
    if folds:
        lines += ["", "Folded commit (block-diffusion shapes): the model's own loop through the engine, random "
                  "weights, decode forwards and seconds per 100 generated tokens with the finished block's K/V "
                  "committed by the forward that starts the next block, and with one extra forward per finished block.", "",
                  "| shape | tokens | fold forwards/100 | extra forwards/100 | forwards saved/100 | fold s/100 | "
                  "extra s/100 | seconds saved/100 |", "|---|---|---|---|---|---|---|---|"]
        for shape, r in folds.items():
            lines.append(f"| {shape} | {r['fold']['generated']} | {r['fold']['forwards_per_100']:.1f} | "
                         f"{r['extra']['forwards_per_100']:.1f} | {r['forwards_saved_per_100']:.1f} | "
                         f"{r['fold']['decode_s_per_100']:.3f} | {r['extra']['decode_s_per_100']:.3f} | "
                         f"{r['decode_s_saved_per_100']:.3f} |")
    (args.out / "step_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for shape in shapes:
            for W in windows:
                case = [r for r in rows if r["shape"] == shape and r["W"] == W and r["P"] == 512]
                if case:  # the engine's default path (graphs + fused on a GPU, eager on a CPU) and its roofline
                    line, = ax.plot([r["k"] for r in case], [r.get("lopa_fused_ms", r["lopa_ms"]) for r in case],
                                    marker="o", label=f"{shape} W={W} P=512")
                    ax.plot([r["k"] for r in case], [r["roofline_ms"] for r in case], ls="--", color=line.get_color(),
                            label=f"roofline {shape} W={W}")
                    fp8_rows = [r for r in case if "lopa_fp8_ms" in r]
                    if fp8_rows:
                        ax.plot([r["k"] for r in fp8_rows], [r["lopa_fp8_ms"] for r in fp8_rows], ls=":", marker="x",
                                color=line.get_color(), label=f"{shape} W={W} fp8")
        ax.set_xlabel("k (lookahead branches)")
        ax.set_ylabel("ms per LoPA iteration")
        ax.set_title(f"one LoPA iteration on {meta['device']}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / "step_latency.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
