"""Host time per decode step: the device path (engine/device.py) beside the host strategies, in one run (issues 25, 26).

For each strategy (lopa k=7, d2f) and each n in --ns, the same --prompts generated GSM8K-style problems (default:
max(--ns) of them) through the engine with at most n running at once, each finished request replaced by the next
problem (n closed-loop clients: n = 1 decodes them one after another, n = --prompts all at once), twice in one
process (pass 0: cold, pass 1: the same problems again), in each of --modes:

    host     RunnerConfig.device_step=False: today's host strategies, graphs captured lazily
    device   device_step=True without the warm-up: the device path, its graphs captured lazily
    warm-host  the warm mode's start-up with device_step=False: the host strategies on the same warmed graphs
             (which of the two paths a step of n requests should take)
    eager    the device path without CUDA graphs (cuda_graphs=False): every kernel launched one by one (with
             --profile, a kernel table that does not depend on the profiler tracing inside graph replays)
    warm     warmup=True, attention "flex", device_step on (what RunnerConfig's "auto" picks on a GPU): every graph
             captured inside load_model (--warm-tokens, --warm-positions); its start-up (seconds, graphs, GPU
             memory) is in the meta
    flex     the device path with attention "flex" and slots of --warm-positions, graphs captured lazily (no warm-up)
    flat     the same with the step's forward on the flat query axis (DevicePath.flat_tile = --flat-tile: each
             request's queries back to back, not padded to the widest one's, for all but the attention) where a
             step has a flat count (engine/device.py: flat_counts)
    warm-flat  the warm mode with RunnerConfig.flat_queries: the flat counts captured at start-up too

Each mode starts ONE model (max_num_seqs = max(--ns)) and runs every (strategy, n) on it in order, as a server
would see them. Pass 0 of the lazy modes is cold for graphs (each n grows the KV pool, which drops the captured
graphs; compiled kernels stay); per row the captures and eager steps after start-up.

Per decode step in which n requests run:

    wall ms      the engine step (StepInfo.seconds: the whole step, from its scheduling and slot moves to its
                 outputs; before 6d82acd it left out the moves, the finished requests' read-back and results)
    queries      real: the step's query positions (sum of K*W); padded: what the static path's "flex" key computes
                 for it, B bucket x query bucket (the same count whatever the mode ran)
    forward ms   the forward's own device time: CUDA events around each graph replay (the static path, the
                 default on a GPU: forward + batched predict); on the CPU the wall time of the eager forward
                 and its predictions
    host ms      wall - forward: what the step spends outside the forward's device time. On a GPU the device
                 path's step is ONE captured graph (forward + update + commit), so its forward column includes
                 the update's kernels and host ms is the host alone; on the host path host ms is the
                 strategies' Python, packing, splitting and the commit. What a step runs eagerly or captures
                 (pass 0 of the lazy modes) counts as host. On the CPU the device path's update runs as eager
                 ops and counts as host.

Throughput: tokens up to EOS / the engine's decode-step seconds (prefill apart), and its ratio to n = 1 of the
same mode and pass: the same problems and tokens, one request at a time. (Before --prompts, n = 1 decoded the first
problem alone, a baseline that moved with that one problem's length and steps.) ``tokens_equal``: each mode's pass 1
gave the host mode's tokens for every request (the warm mode attends with FlexAttention, the others with SDPA: in
bfloat16 a token may differ), and its pass 0 its pass 1's.
Results are written after every row (a run cut short keeps the rows it finished).

    PYTHONPATH=src python3 benchmarks/host_step.py --out benchmarks/results/host_step_h100   # the whole grid
    PYTHONPATH=src python3 benchmarks/host_step.py --strategies d2f --modes warm,host --out /tmp/d2f
    PYTHONPATH=src python3 benchmarks/host_step.py --tiny --out /tmp/x          # CPU smoke test
    PYTHONPATH=src python3 benchmarks/host_step.py --ns 1,32 --strategies lopa --modes warm,host,eager --profile 1,32 \
        --warm-positions 8192 --out /tmp/p     # kernel tables of pass 1 (profile_<mode>_lopa_<n>.txt)
    PYTHONPATH=src python3 benchmarks/host_step.py --shape dream-7b --k 3 --ns 1,32 --modes warm,host \
        --warm-tokens 16384 --out benchmarks/results/host_step_dream7b     # issue 26's Dream-7B host share

Block-diffusion models (--family sdar | fast_dllm_v2; strategies "own" = the family's own loop at tau 0.9 and
"lopa-bd" = lopa k=3 over it): a random checkpoint of the family (blocks of 4 for SDAR, 32 with sub-blocks of 8 for
Fast-dLLM v2, --random-hidden / --random-layers wide; --tiny: the tests' tiny sizes), or --model FOLDER:

    PYTHONPATH=src python3 benchmarks/host_step.py --family sdar --strategies own,lopa-bd --out /tmp/sdar
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lopa
from lopa.api import build_model
from lopa.config import decode_config
from lopa.eval.tasks import gsm8k
from lopa.runner.graphs import bucket, query_bucket
from lopa.runner.model_runner import ModelRunner

from step_latency import git_commit

def strategies(k: int) -> dict[str, tuple[str, dict]]:
    """--strategies name -> (row label, DecodeConfig fields); "own" and "lopa-bd" name the model's loop (strategy)."""
    return {"lopa": (f"lopa k={k}", dict(strategy="lopa", k=k)), "d2f": ("d2f", dict(strategy="d2f")),
            "own": ("own", dict(tau=0.9)), "lopa-bd": ("lopa k=3 (bd)", dict(strategy="lopa", k=3, tau=0.9))}


def strategy(name: str, fields: dict, model_type: str) -> dict:
    """The decode settings of --strategies' ``name`` for the model (the block-diffusion entries name its loop)."""
    kw = dict(fields)
    if name == "own":
        kw["strategy"] = model_type
    elif name == "lopa-bd":
        kw["base"] = model_type
    return kw


class ForwardClock:
    """Device time of every forward of a step: CUDA events around graph replays (perf_counter around the eager
    forward on the CPU). Installed for the run; ``take()`` returns the ms since the last take."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.spans, self.cpu_ms = cuda, [], 0.0
        self._patches = []

    def _wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            if clock.cuda and torch.cuda.is_current_stream_capturing():
                return real(*args, **kwargs)
            if clock.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = real(*args, **kwargs)
                end.record()
                clock.spans.append((start, end))
                return out
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            clock.cpu_ms += 1e3 * (time.perf_counter() - t0)
            return out

        setattr(owner, name, timed)
        self._patches.append((owner, name, real))

    def __enter__(self):
        if self.cuda:  # the static path (the default on a GPU): forward + batched predict in one replay
            self._wrap(torch.cuda.CUDAGraph, "replay")
        else:  # eager: the host path's forward + per-request predict, the device path's forward + batched predict
            self._wrap(ModelRunner, "_eager")
            self._wrap(ModelRunner, "forward_packed")
            self._wrap(ModelRunner, "forward_flat")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._patches):
            setattr(owner, name, real)

    def take(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            ms = sum(s.elapsed_time(e) for s, e in self.spans)
        else:
            ms = self.cpu_ms
        self.spans, self.cpu_ms = [], 0.0
        return ms


def run_pass(model, prompts: list[list[int]], n: int, config, clock: ForwardClock) -> dict:
    """The prompts (token ids) through the engine, at most n running: each finished request is replaced by the next
    prompt (n closed-loop clients); per full decode step (n running): wall and forward ms."""
    engine = model.engine
    c = engine.counters
    before = (c.decode_s, c.captures_after_start, c.eager_decode_steps, c.device_steps)
    seqs = [engine.prepare(p, config) for p in prompts]
    waiting = iter(seqs)
    for seq in itertools.islice(waiting, n):
        engine.add(seq)
    results, walls, forwards, positions, padded = {}, [], [], [], []
    clock.take()
    while engine.has_work():
        outs = engine.step()
        forward_ms = clock.take()
        info = engine.last_step
        if info is not None and info.kind == "decode" and info.requests == n:
            walls.append(1e3 * info.seconds)
            forwards.append(forward_ms)
            positions.append(info.positions)
            padded.append(bucket(info.requests, model.runner.max_num_seqs) * query_bucket(info.queries))
        for out in outs:
            if out.error is not None:
                raise out.error
            if out.finished:
                results[out.request_id] = out.result
                following = next(waiting, None)
                if following is not None:
                    engine.add(following)
    tokens = [results[s.id].token_ids for s in seqs]
    generated = sum(results[s.id].stats.generated_tokens for s in seqs)
    decode_s = c.decode_s - before[0]
    hosts = [w - f for w, f in zip(walls, forwards)]
    return {"full_steps": len(walls), "wall_ms": statistics.median(walls), "forward_ms": statistics.median(forwards),
            "host_ms": statistics.median(hosts), "host_ms_mean": statistics.fmean(hosts),
            "positions": statistics.fmean(positions), "padded": statistics.fmean(padded),
            "tokens": generated, "tokens_per_s": generated / decode_s, "decode_s": decode_s,
            "captures": c.captures_after_start - before[1], "eager_steps": c.eager_decode_steps - before[2],
            "device_steps": c.device_steps - before[3], "token_ids": tokens}


MODES = ("warm", "host", "device", "eager", "warm-host", "flex", "flat", "warm-flat")
HOST_MODES = ("host", "warm-host")  # the host strategies


@contextlib.contextmanager
def profiled(on: bool, path: Path, title: str, cuda: bool):
    """--profile: torch.profiler around the block, its kernel table (by device time; kernels inside CUDA graph
    replays appear where the profiler can trace them) written to ``path``."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        yield
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40,
                                      max_name_column_width=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"## {title}\n\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1,8,32,64", help="concurrent requests")
    ap.add_argument("--prompts", type=int, default=None,
                    help="problems every n decodes, at most n at a time (default: max(--ns); module docstring)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--strategies", default="lopa,d2f", help="lopa (k = --k), d2f, own, lopa-bd (module docstring)")
    ap.add_argument("--k", type=int, default=7, help="lopa's k")
    ap.add_argument("--shape", default=None, help="random weights at a step_latency.py shape (dream-7b, llada-8b, "
                    "...; prompts of random ids, GSM8K-like lengths) instead of the embedded default model")
    ap.add_argument("--modes", default="warm,host,device",
                    help="warm, host, device, eager, warm-host, flex, flat and/or warm-flat (module docstring)")
    ap.add_argument("--warm-tokens", type=int, default=64 * 1024,
                    help="warm: RunnerConfig.max_num_batched_tokens, the padded queries (B bucket x Qb) the warm-up "
                         "captures up to (default: 64 lopa k=7 requests of up to 1024 queries, gen_length 128)")
    ap.add_argument("--warm-positions", type=int, default=2048,
                    help="warm: RunnerConfig.max_positions, KV positions a slot (lopa k=7 needs prompt + 8 x "
                         "gen_length + 1)")
    ap.add_argument("--flat-tile", type=int, default=1,
                    help="the flat mode's segments padded to a multiple of this (DevicePath.flat_tile)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke test)")
    ap.add_argument("--family", default="dream", choices=("dream", "sdar", "fast_dllm_v2"),
                    help="sdar / fast_dllm_v2: a random checkpoint of that family (module docstring)")
    ap.add_argument("--random-hidden", type=int, default=1024, help="--family: hidden size of the random model")
    ap.add_argument("--random-layers", type=int, default=12, help="--family: layers of the random model")
    ap.add_argument("--model", type=Path, default=None, help="a model folder instead (e.g. SDAR-1.7B-Chat)")
    ap.add_argument("--profile", default="", help="comma-separated n: profile pass 1 of those n in every mode and "
                    "strategy (torch.profiler kernel tables, profile_<mode>_<strategy>_<n>.txt beside the results)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_step"))
    args = ap.parse_args()
    most = max(int(x) for x in args.ns.split(","))
    args.prompts = args.prompts or most
    if args.prompts < most:
        ap.error(f"--prompts {args.prompts} is fewer than the largest n ({most}): that n would never run")
    with contextlib.ExitStack() as stack:
        path = args.model
        if path is None and (args.tiny or args.family != "dream"):
            from lopa.models.tiny import write_tiny_checkpoint

            folder = stack.enter_context(tempfile.TemporaryDirectory())
            hidden = args.random_hidden
            sizes = {} if args.tiny else dict(hidden_size=hidden, num_layers=args.random_layers, num_heads=hidden // 64,
                                              num_kv_heads=hidden // 256, intermediate_size=3 * hidden,
                                              max_position_embeddings=4096)
            if not args.tiny and args.family != "dream":
                sizes["block_size"] = 4 if args.family == "sdar" else 32  # the published sizes
            path = write_tiny_checkpoint(folder, model_type=args.family, **sizes)
        if args.tiny:
            args.device = "cpu"
        rows, meta = measure(path, args, lambda rows, meta: write(args.out, rows, meta))
    print(markdown(meta, rows))


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "host_step.md").write_text(markdown(meta, rows))


def _load(path, args, mode: str, n: int):
    """One model for the mode: the embedded default (or --tiny's), or random weights at --shape."""
    if mode in ("warm", "warm-host", "warm-flat"):
        runner = lopa.RunnerConfig(device=args.device, max_num_seqs=n, warmup=True, attention="flex",
                                   device_step=mode != "warm-host", max_num_batched_tokens=args.warm_tokens,
                                   max_positions=args.warm_positions, flat_queries=mode == "warm-flat")
    elif mode in ("flex", "flat"):
        runner = lopa.RunnerConfig(device=args.device, max_num_seqs=n, device_step=True, attention="flex",
                                   max_positions=args.warm_positions)
    else:
        runner = lopa.RunnerConfig(device=args.device, max_num_seqs=n, device_step=mode != "host",
                                   cuda_graphs=mode != "eager")
    if args.shape is None:
        model = lopa.load_model(path, runner=runner)
    else:
        from bp_latency import RandomSource

        model = build_model(RandomSource(args.shape), runner, name=Path(f"random-{args.shape}"))
    if mode == "flat":
        model.engine.device.flat_tile = args.flat_tile
    return model


def prompt_ids(model, n: int) -> list[list[int]]:
    """n GSM8K-style problems as token ids; a model without a tokenizer (random weights) gets random ids of
    100-249 tokens, as the default tokenizer makes of those problems (seeded)."""
    if model.tokenizer is not None:
        return [model.tokenizer.encode(p.prompt) for p in gsm8k(None, n)]
    g = torch.Generator().manual_seed(0)
    spec = model.loaded.spec
    top = min(spec.mask_id, *spec.eos_ids)  # ordinary ids: the special ones sit at the vocabulary's end
    return [torch.randint(0, top, (100 + (i * 53) % 150,), generator=g).tolist() for i in range(n)]


def _family_name(args) -> str:
    return "default" if args.family == "dream" else f"random {args.family} {args.random_hidden}x{args.random_layers}"


def _meta(model, args) -> dict:
    cuda = model.runner.device.type == "cuda"
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "model": str(args.model) if args.model else "tiny" if args.tiny else args.shape or _family_name(args),
            "dtype": str(model.runner.dtype),
            "gen_length": args.gen_length, "prompts": args.prompts, "commit": git_commit(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _start(model, args) -> dict | None:
    """The warm mode's start-up, as load_model logged it."""
    g = model.runner.graphs
    if g is None:  # the CPU: nothing to capture
        return None
    return {"graphs": g.stats.warmup_graphs, "device_graphs": len(model.engine.device.graphs),
            "seconds": g.stats.warmup_s, "gib": g.stats.warmup_bytes / 2**30, "positions": model.runner.slot_capacity(),
            "max_num_batched_tokens": args.warm_tokens}


def measure(path, args, save) -> tuple[list[dict], dict]:
    """Every (strategy, n) in every mode, both passes; ``save(rows, meta)`` after each."""
    ns = [int(x) for x in args.ns.split(",")]
    modes = args.modes.split(",")
    table = strategies(args.k)
    keys = {table[s][0]: s for s in args.strategies.split(",")}  # row label -> --strategies name
    names = list(keys)
    rows = {(name, n): {"strategy": name, "n": n} for name in names for n in ns}
    ids: dict[tuple, list] = {}  # (strategy, n, mode) -> token ids of pass 0 and pass 1
    meta: dict = {}
    for mode in modes:
        model = _load(path, args, mode, max(ns))  # one start-up per mode for the whole grid
        meta.update({k: v for k, v in _meta(model, args).items() if k not in meta})
        if mode in ("warm", "warm-flat"):
            meta[mode.replace("-", "_") + "_start"] = _start(model, args)
        problems = prompt_ids(model, args.prompts)
        for name in names:
            for n in ns:
                cuda = model.runner.device.type == "cuda"
                config = decode_config(None, model.model_type, gen_length=args.gen_length,
                                       **strategy(keys[name], table[keys[name]][1], model.model_type))
                with torch.inference_mode(), ForwardClock(cuda) as clock:
                    passes = [run_pass(model, problems, n, config, clock)]
                    with profiled(str(n) in args.profile.split(","), args.out / f"profile_{mode}_{keys[name]}_{n}.txt",
                                  f"{mode} mode, {name}, n = {n}, pass 1", cuda):
                        passes.append(run_pass(model, problems, n, config, clock))
                assert all((p["device_steps"] > 0) == (mode not in HOST_MODES) for p in passes), mode
                ids[name, n, mode] = [p.pop("token_ids") for p in passes]
                rows[name, n][mode] = {"pass0": passes[0], "pass1": passes[1]}
                ref = ids.get((name, n, "host"), ids[name, n, modes[0]])[1]
                for m in modes:
                    if (name, n, m) in ids:
                        p0, p1 = ids[name, n, m]
                        rows[name, n][m]["tokens_equal"] = p1 == ref and p0 == p1
                save(_ratios(list(rows.values())), meta)
                print(json.dumps(rows[name, n]), flush=True)
        model.close()
        del model
        gc.collect()
    return _ratios(list(rows.values())), meta


def _ratios(rows: list[dict]) -> list[dict]:
    """tokens/s against n = 1 of the same strategy, mode and pass (None until that row ran)."""
    for row in rows:
        one = next((r for r in rows if r["strategy"] == row["strategy"] and r["n"] == 1), None)
        for mode in MODES:
            for p in ("pass0", "pass1"):
                if mode in row:
                    base = one.get(mode, {}).get(p) if one else None
                    row[mode][p]["vs_n1"] = row[mode][p]["tokens_per_s"] / base["tokens_per_s"] if base else None
    return [r for r in rows if any(m in r for m in MODES)]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Host time per decode step, {meta.get('model')} model on {meta.get('device')} ({meta.get('dtype')}, "
             f"gen_length {meta.get('gen_length')}, commit {meta.get('commit')}, {meta.get('date')}). Every n decodes "
             f"the same {meta.get('prompts')} problems, at most n at a time (each finished request replaced by the "
             "next). Medians over the steps in which n requests ran; host = wall - forward. tok/s: tokens up to EOS / "
             "decode-step seconds; xN1: against n = 1 (the same problems one at a time) of the same mode and pass. "
             "Pass 0: the first time the workload runs in the process; pass 1: the same problems again.", ""]
    for mode in ("warm", "warm_flat"):
        warm = meta.get(mode + "_start")
        if warm:
            lines += [f"{mode.replace('_', '-')} start-up: {warm['graphs']} CUDA graphs ({warm['device_graphs']} of "
                      f"them the device path's) in {warm['seconds']:.1f} s, {warm['gib']:.2f} GiB, "
                      f"{warm['positions']} positions a slot, max_num_batched_tokens {warm['max_num_batched_tokens']}.",
                      ""]
    lines += ["| strategy | n | mode | pass 0: wall / host ms | pass 0 tok/s (xN1) | pass 1: wall / forward / host "
              "ms | pass 1 tok/s (xN1) | captures / eager steps (pass 0, 1) | tokens equal | queries real / padded |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    tps = lambda x: f"{x['tokens_per_s']:.0f}" + (f" ({x['vs_n1']:.1f}x)" if x.get("vs_n1") else "")  # noqa: E731
    for r in rows:
        for mode in MODES:
            if mode not in r:
                continue
            p0, p1 = r[mode]["pass0"], r[mode]["pass1"]
            lines.append(f"| {r['strategy']} | {r['n']} | {mode} | {p0['wall_ms']:.2f} / {p0['host_ms']:.2f} | "
                         f"{tps(p0)} | {p1['wall_ms']:.2f} / {p1['forward_ms']:.2f} / {p1['host_ms']:.2f} | "
                         f"{tps(p1)} | "
                         f"{p0['captures']}, {p1['captures']} / {p0['eager_steps']}, {p1['eager_steps']} | "
                         f"{r[mode].get('tokens_equal', '')} | {p1['positions']:.0f} / {p1['padded']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
