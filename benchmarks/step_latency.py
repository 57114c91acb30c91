"""Time one full LoPA iteration at Dream-7B / LLaDA-8B shape, against transformers, against the roofline.

One iteration, through lopa's own runner (eager; CUDA graphs: runner/graphs.py; CUDA graphs with the fused
elementwise kernels the engine uses by default: models/fused.py) = forward of
K = k+1 branches x W window columns over a cached P-token prefix, logits for the still-masked columns, confidences (lopa.decoding.confidence.predict), branch scores (Eq. 2), the winner's
selection and its KV commit. In the same run, the same iteration the way users can do it today with
`transformers` (Qwen2 with a bidirectional 4-D mask, SDPA): the k+1 branches one after another over the
prefix cache (as the published LoPA code does), and batched. Also measured in the same run: the device's
bf16 matmul rate and copy bandwidth, from which the roofline of each case is computed.

    PYTHONPATH=src python3 benchmarks/step_latency.py --out results/      # GPU
    PYTHONPATH=src python3 benchmarks/step_latency.py --tiny --out /tmp/x  # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lopa.decoding.base import ForwardBatch, ModelSpec, PredictSpec
from lopa.decoding.confidence import mean_confidence, predict
from lopa.models.attention import branch_mask
from lopa.models.config import ModelConfig
from lopa.models.fused import EAGER, fused_ops
from lopa.models.transformer import Transformer
from lopa.runner.graphs import GraphRunner
from lopa.runner.single import Runner

SHAPES = {
    "dream-7b": dict(model_type="dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                     mask_token_id=151666, eos_token_id=151643),
    "llada-8b": dict(model_type="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32,
                     num_heads=32, num_kv_heads=32, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     mask_token_id=126336, eos_token_id=126081),
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
    return {"matmul_flops": flops, "copy_bytes_per_s": 2 * src.numel() * 2 / t}


def costs(cfg: ModelConfig, K: int, W: int, P: int, bytes_per_param: float = 2.0) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one iteration: all weights read once, the prefix KV read once."""
    E, L, H, Hkv, D, I, V = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    per_layer = E * (H + 2 * Hkv) * D + H * D * E + 3 * E * I
    n = K * W
    flops = 2 * n * (L * per_layer + E * V) + L * 4 * n * (P + W) * H * D
    weight_bytes = (L * per_layer + 2 * E * V) * bytes_per_param
    kv_bytes = L * 2 * Hkv * D * (P + n) * 2
    return flops, weight_bytes + kv_bytes


def lopa_iteration(model, cfg, K, W, P, device, dtype, graphs: bool = False, fuse: bool = False):
    """A closure running one LoPA iteration through lopa's runner (eager, or GraphRunner with CUDA graphs,
    optionally with the fused elementwise kernels as load_model sets them up on a GPU).

    The prefix stays fixed: after the winner's commit the cache length is rolled back each time."""
    spec = ModelSpec(cfg.mask_token_id, (cfg.eos_token_id,), cfg.max_position_embeddings, cfg.vocab_size)
    ops = fused_ops(device, dtype) if fuse else EAGER  # set on the model by each step (shared model)
    runner = GraphRunner(model, spec, device, dtype, fuse=fuse) if graphs else Runner(model, spec, device, dtype)
    runner.cache = runner._new_cache(P + K * W + 256)  # room for the prefix and every branch's window
    with torch.inference_mode():
        prefix = torch.randint(0, cfg.vocab_size - 2, (1, P), device=device)
        h = model(prefix, start=0, cache=runner.cache, attn_mask=branch_mask(0, 1, P, device=device))
        runner.cache.commit(0, P, P, h[0, -1])
    tokens = torch.randint(0, cfg.vocab_size - 2, (K, W))
    tokens[:, W // 2:] = cfg.mask_token_id
    batch = ForwardBatch(tokens, P, torch.arange(W // 4, W), commit=W // 4)  # predictions for the ¾ still open
    pspec = PredictSpec(suppress_ids=(cfg.mask_token_id,))

    @torch.inference_mode()
    def step():
        model.ops = ops  # closures of one model share it: each sets its own
        preds = runner.forward(batch, pspec)
        still = tokens[:, batch.logit_cols] == cfg.mask_token_id
        winner = int(torch.argmax(mean_confidence(preds.conf, still)))
        runner.commit(winner, batch.commit)
        runner.cache.length = P  # roll back so every repetition sees the same prefix
    step.runner = runner
    return step


def profile_case(cfg: ModelConfig, k: int, W: int, P: int, device, dtype, out: Path) -> None:
    """Kernel-level breakdown of one iteration (eager and graphs): where the time above the roofline goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype).eval()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    report = []
    for name, graphs, fuse in (("eager", False, False), ("CUDA graphs", True, False), ("CUDA graphs, fused", True, True)):
        step = lopa_iteration(model, cfg, k + 1, W, P, device, dtype, graphs=graphs, fuse=fuse)
        wall = timed(step, device, warmup=3, reps=10)
        with profile(activities=acts) as prof:
            for _ in range(5):
                step()
            sync(device)
        table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                          row_limit=30, max_name_column_width=70)
        replay = ""
        if graphs and device.type == "cuda":  # the captured graph alone: the GPU's share of the iteration
            (st,) = step.runner.statics.values()
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
    ap.add_argument("--profile", default="", help="k:W:P: instead of the grid, profile that case (first shape; "
                    "eager and CUDA-graph iterations) with torch.profiler and write the kernel table")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    ks = [int(x) for x in args.ks.split(",")]
    windows = [int(x) for x in args.windows.split(",")]
    prefixes = [int(x) for x in args.prefixes.split(",")]
    hf_cases = [tuple(int(v) for v in c.split(":")) for c in args.hf_cases.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    peak = measure_device(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}: "
          f"{peak['matmul_flops'] / 1e12:.0f} TFLOP/s bf16 matmul, {peak['copy_bytes_per_s'] / 1e12:.2f} TB/s copy", flush=True)
    if args.profile:
        profile_case(ModelConfig(**SHAPES[shapes[0]]), *(int(v) for v in args.profile.split(":")), device, dtype, args.out)
        return
    rows = []
    for shape in shapes:
        cfg = ModelConfig(**SHAPES[shape])
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg).to(dtype).eval()
        hf = hf_model(cfg, device, dtype) if (shape in args.hf.split(",") or args.tiny) and cfg.model_type == "dream" else None
        for P in prefixes:
            for W in windows:
                for k in ks:
                    K = k + 1
                    t = timed(lopa_iteration(model, cfg, K, W, P, device, dtype), device, reps=args.reps)
                    flops, nbytes = costs(cfg, K, W, P)
                    roof = max(flops / peak["matmul_flops"], nbytes / peak["copy_bytes_per_s"])
                    row = dict(shape=shape, k=k, W=W, P=P, lopa_ms=t * 1e3, roofline_ms=roof * 1e3, x_roofline=t / roof,
                               bound="compute" if flops / peak["matmul_flops"] > nbytes / peak["copy_bytes_per_s"] else "memory")
                    if device.type == "cuda":
                        tg = timed(lopa_iteration(model, cfg, K, W, P, device, dtype, graphs=True), device, reps=args.reps)
                        tf = timed(lopa_iteration(model, cfg, K, W, P, device, dtype, graphs=True, fuse=True), device,
                                   reps=args.reps)
                        row.update(lopa_graph_ms=tg * 1e3, graph_x_roofline=tg / roof, lopa_fused_ms=tf * 1e3,
                                   fused_x_roofline=tf / roof)
                    if hf is not None and ((k, W, P) in hf_cases or args.tiny):
                        row["hf_sequential_ms"] = timed(hf_iteration(hf, cfg, K, W, P, device, dtype, False), device, 1, 3) * 1e3
                        row["hf_batched_ms"] = timed(hf_iteration(hf, cfg, K, W, P, device, dtype, True), device, 2, 5) * 1e3
                        best = row.get("lopa_fused_ms", row["lopa_ms"])  # the engine's default path
                        row["speedup_vs_hf_sequential"] = row["hf_sequential_ms"] / best
                        row["speedup_vs_hf_batched"] = row["hf_batched_ms"] / best
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del model, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="benchmarks/step_latency.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
                peak_tflops=peak["matmul_flops"] / 1e12, copy_tbps=peak["copy_bytes_per_s"] / 1e12)
    (args.out / "step_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}; measured "
             f"{meta['peak_tflops']:.0f} TFLOP/s, {meta['copy_tbps']:.2f} TB/s", "",
             "| shape | k | W | P | lopa eager ms | lopa graphs ms | lopa graphs+fused ms | roofline ms | graphs+fused x roofline "
             "| HF sequential ms | HF batched ms | graphs+fused vs seq | graphs+fused vs batched |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf_cols = [f"{r[c]:.1f}" if c in r else "" for c in ("hf_sequential_ms", "hf_batched_ms")]
        sp = [f"{r[c]:.2f}x" if c in r else "" for c in ("speedup_vs_hf_sequential", "speedup_vs_hf_batched")]
        graph, fused = (f"{r[c]:.2f}" if c in r else "" for c in ("lopa_graph_ms", "lopa_fused_ms"))
        fx = f"{r['fused_x_roofline']:.2f}" if "fused_x_roofline" in r else ""
        lines.append(f"| {r['shape']} | {r['k']} | {r['W']} | {r['P']} | {r['lopa_ms']:.2f} | {graph} | {fused} | "
                     f"{r['roofline_ms']:.2f} | {fx} | {' | '.join(hf_cols)} | {' | '.join(sp)} |")
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
