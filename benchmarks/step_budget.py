"""The decode steps of the serve_load workload against the warmed shapes, with and without the step budget.

`benchmarks/serve_load.py`'s requests (GSM8K-style prompts from lopa's generated test split, lopa k=7,
gen_length 128, greedy) through ``lopa.generate_many`` with max_num_seqs = --concurrency on a warmed-up model: the
static path's keys and the device path's (B bucket x query bucket <= RunnerConfig.max_num_batched_tokens), as
``load_model`` captures them on a GPU. On a CPU the same warm-up runs each key once instead of a capture (the
shapes do not depend on the device; the times do). Per variant, the same prompts twice (the first pass is
timed too, there is nothing left to warm up):

* "no budget": every running request in every decode step (the engine before the step budget: a step whose
  padded B x Qb passes the warmed set runs eagerly, counted in eager_decode_steps);
* "budget": the scheduler's step budget (engine/scheduler.py: the first requests that have a warmed shape
  together run, the others wait a step; the running order rotates).

Per decode step: requests B and the largest request's queries q = K*W (Engine.step_log), so the table gives how
often and how far the steps pass the budget (padded B bucket x query bucket over max_num_batched_tokens). Per
pass: decode steps, partial steps (the budget left requests waiting), eager decode steps, decode seconds and
tokens/s (tokens up to EOS over decode seconds), and whether each request's tokens equal the other variant's.

    PYTHONPATH=src python3 benchmarks/step_budget.py --out benchmarks/results/step_budget_h100             # GPU
    PYTHONPATH=src python3 benchmarks/step_budget.py --device cpu --threads 1 --out /tmp/sb               # CPU
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch

import lopa
from lopa.api import WARMUP_POSITIONS, _warm_up
from lopa.engine import Engine
from lopa.eval.tasks import gsm8k
from lopa.runner.graphs import bucket, query_bucket
from lopa.runner.model_runner import ModelRunner


def warmed_model(args):
    """The embedded model warmed up as load_model does on a GPU (RunnerConfig warmup=True, device_step True); on a
    CPU the static path is built by hand (load_model warms up on a GPU only) and its warm-up runs each key once."""
    runner = lopa.RunnerConfig(device=args.device, max_num_seqs=args.concurrency, device_step=args.device_step,
                               max_num_batched_tokens=args.max_tokens, warmup=True)
    if args.device != "cpu":
        return lopa.load_model(runner=runner)
    model = lopa.load_model(runner=dataclasses.replace(runner, warmup=False))
    loaded = model.loaded
    mr = ModelRunner(loaded.model, loaded.spec, torch.device("cpu"), torch.float32, max_num_seqs=args.concurrency,
                     max_positions=args.cpu_positions, static=True, capture=False, attention="flex")
    engine = Engine(mr, loaded.spec, args.concurrency, max_num_batched_tokens=args.max_tokens,
                    device_step=args.device_step)
    _warm_up(mr, engine, args.max_tokens)
    return dataclasses.replace(model, runner=mr, engine=engine)


def run_pass(model, prompts, config) -> dict:
    engine = model.engine
    engine.step_log = log = []
    before = engine.counters.as_dict()
    t0 = time.perf_counter()
    results = lopa.generate_many(model, prompts, config)
    wall = time.perf_counter() - t0
    after = engine.counters.as_dict()
    d = {k: after[k] - before[k] for k in ("decode_steps", "decode_s", "partial_steps", "deferred_requests",
                                           "eager_decode_steps", "captures_after_start", "recompiles_after_start")}
    tokens = sum(r.stats.generated_tokens for r in results)
    slots = engine.runner.pool.slots
    steps = [(s.requests, s.queries) for s in log if s.kind == "decode"]
    return {**d, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / d["decode_s"],
            "steps": steps, "over_budget": sum(bucket(B, slots) * query_bucket(q) > engine.max_num_batched_tokens
                                               for B, q in steps),
            "token_ids": [r.token_ids for r in results]}


def without_ids(state: dict) -> dict:
    """The state for the JSON file: the answers' token ids left out (the equal counts stay)."""
    passes = {name: [{k: v for k, v in p.items() if k != "token_ids"} for p in ps]
              for name, ps in state["passes"].items()}
    return {**state, "passes": passes}


def markdown(state: dict) -> str:
    meta = state["meta"]
    lines = [f"Device: {meta['device']}; commit {meta['commit']}; {meta['date']}; {meta['settings']}; "
             f"max_num_seqs {meta['concurrency']}, max_num_batched_tokens {meta['max_tokens']}, device_step "
             f"{meta['device_step']}; warm-up {meta['warmup_graphs']} graphs in {meta['warmup_s']:.1f} s.", "",
             "| variant | pass | decode steps | over budget (padded B x Qb) | partial steps (requests left waiting) | "
             "eager decode steps | captures / recompiles | decode s | tokens | tokens/s | tokens equal 'no budget' |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = state["passes"]["no budget"]
    for name, passes in state["passes"].items():
        for i, p in enumerate(passes):
            equal = p["equal_to_no_budget"] = sum(a == b for a, b in zip(p["token_ids"], ref[i]["token_ids"]))
            lines.append(f"| {name} | {i} | {p['decode_steps']} | {p['over_budget']} | {p['partial_steps']} "
                         f"({p['deferred_requests']}) | {p['eager_decode_steps']} | {p['captures_after_start']} / "
                         f"{p['recompiles_after_start']} | {p['decode_s']:.2f} | {p['tokens']} | "
                         f"{p['tokens_per_s']:.0f} | {equal}/{len(p['token_ids'])} |")
    lines += ["", "Decode steps by (requests B, largest request's queries q = K*W) -> padded B bucket x query "
              "bucket, first pass of each variant:", "", "| variant | B | q | B bucket x Qb | steps |",
              "|---|---|---|---|---|"]
    for name, passes in state["passes"].items():
        hist = collections.Counter(map(tuple, passes[0]["steps"]))
        for (B, q), n in sorted(hist.items()):
            lines.append(f"| {name} | {B} | {q} | {bucket(B, meta['concurrency']) * query_bucket(q)} | {n} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_budget"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concurrency", type=int, default=16, help="max_num_seqs (serve_load's largest level)")
    ap.add_argument("--requests", type=int, default=64, help="serve_load's N at c=16: max(32, 4c)")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=lopa.RunnerConfig.max_num_batched_tokens)
    ap.add_argument("--device-step", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cpu-positions", type=int, default=2048, help="KV positions a slot holds on a CPU (a GPU: "
                    f"{WARMUP_POSITIONS}, load_model's)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [p.prompt for p in gsm8k(None, args.requests)]
    model = warmed_model(args)
    config = lopa.decode_config(None, model.model_type, strategy="lopa", k=args.k, gen_length=args.gen_length)
    stats = model.runner.graphs.stats
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    state = {"meta": {"device": device, "commit": commit, "concurrency": args.concurrency,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "settings": {"strategy": "lopa", "k": args.k, "gen_length": args.gen_length,
                                   "requests": args.requests}, "max_tokens": args.max_tokens,
                      "device_step": args.device_step, "warmup_graphs": stats.warmup_graphs,
                      "warmup_s": stats.warmup_s}, "passes": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    take = model.engine.scheduler.take
    for name in ("no budget", "budget"):
        model.engine.scheduler.take = None if name == "no budget" else take
        state["passes"][name] = passes = []
        for i in range(args.passes):
            passes.append(run_pass(model, prompts, config))
            p = passes[-1]
            print(f"{name} pass {i}: {p['decode_steps']} decode steps, {p['over_budget']} over budget, "
                  f"{p['partial_steps']} partial, {p['eager_decode_steps']} eager, {p['tokens_per_s']:.0f} tok/s",
                  flush=True)
            (args.out / "step_budget.md").write_text(markdown(state))  # first: it counts the equal answers
            (args.out / "step_budget.json").write_text(json.dumps(without_ids(state), indent=1))
    print(markdown(state))


if __name__ == "__main__":
    main()
