"""The `lopa` command line: parses flags, calls the public API, prints with Rich."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import api
from .config import RunnerConfig
from .errors import ConfigError, LopaError
from .train.trainer import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fast diffusion-LLM inference with LoPA.")
console = Console(stderr=True)
out = Console()


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {type(err).__name__}: {err}")
    raise typer.Exit(code=2)


def _decode_overrides(**flags) -> dict:
    """CLI flags map one-to-one onto DecodeConfig fields; unset flags keep the preset's value."""
    return {name: value for name, value in flags.items() if value is not None}


@app.command()
def generate(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    strategy: Optional[str] = typer.Option(None, help="threshold | d2f | lopa | dream"),
    preset: Optional[str] = typer.Option(None, help="Paper Table 5 row: gsm8k | math | humaneval | mbpp"),
    k: Optional[int] = typer.Option(None, help="LoPA lookahead branches."),
    tau: Optional[float] = typer.Option(None, help="Fill threshold on max probability, in (0, 1]."),
    block_size: Optional[int] = typer.Option(None),
    gen_length: Optional[int] = typer.Option(None, help="Max new tokens."),
    add_threshold: Optional[float] = typer.Option(None, help="D2F τ_add."),
    complete_threshold: Optional[float] = typer.Option(None, help="D2F τ_act."),
    base: Optional[str] = typer.Option(None, help="What lopa branches over: d2f | threshold"),
    attention: Optional[str] = typer.Option(None, help="Window attention: full | block_causal"),
    confidence: Optional[str] = typer.Option(None, help="prob | neg_entropy | margin"),
    branch_confidence: Optional[str] = typer.Option(None, help="Branch score function (default: mean)."),
    temperature: Optional[float] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    steps: Optional[int] = typer.Option(None, help="dream sampler: diffusion steps."),
    alg: Optional[str] = typer.Option(None, help="dream sampler: origin | maskgit_plus | topk_margin | entropy"),
    max_rounds: Optional[int] = typer.Option(None, help="Cap on decode forwards."),
    compat: Optional[str] = typer.Option(None, help="'published': the published LoPA code's loop, token for token "
                                                    "(Dream models, lopa strategy; docs/fidelity.md)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT LoRA adapter folder (e.g. a D2F adapter)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    quantize: Optional[str] = typer.Option(None, help="Decoder Linears: int8 (weight-only) or fp8 (W8A8, fp8 GEMMs on Hopper/Ada GPUs)."),
    fuse: bool = typer.Option(True, help="On a GPU, fuse RMSNorm/RoPE/SiLU/confidence kernels with torch.compile."),
    devices: int = typer.Option(1, help="Branch Parallel: spread each request's branches over N processes "
                                "(GPUs cuda:0..N-1, or CPU processes), each holding the whole model."),
    trace: Optional[Path] = typer.Option(None, help="Write the per-step trace and stats as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Generate text for one prompt and print the stats line."""
    if prompt == "-":
        prompt = sys.stdin.read()
    overrides = _decode_overrides(
        strategy=strategy, k=k, tau=tau, block_size=block_size, gen_length=gen_length,
        add_threshold=add_threshold, complete_threshold=complete_threshold, base=base, attention=attention,
        confidence=confidence, branch_confidence=branch_confidence, temperature=temperature, top_p=top_p,
        seed=seed, steps=steps, alg=alg, max_rounds=max_rounds, compat=compat,
    )
    if trace is not None:
        overrides["trace"] = True
    try:
        with console.status("loading model"):
            runner = RunnerConfig(device=device, dtype=dtype, quantize=quantize, fuse=fuse, branch_parallel=devices)
            model = api.load_model(path, adapter=adapter, runner=runner)
        gen_total = overrides.get("gen_length")
        with Progress(TextColumn("decoding"), BarColumn(), TextColumn("{task.completed}/{task.total} positions"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("decode", total=gen_total)

            def on_step(state) -> None:
                generated = state.canvas[state.prompt_len:]
                bar.update(task, total=len(generated), completed=int((generated != model.loaded.spec.mask_id).sum()))

            result = api.generate(model, prompt, chat=chat, preset=preset, on_step=on_step, **overrides)
    except LopaError as err:
        _fail(err)
    s = result.stats
    bp = model.engine.bp.as_dict() if devices > 1 else None
    model.close()
    if as_json:
        record = {"text": result.text, "token_ids": result.token_ids, "stats": s.as_dict()}
        out.print_json(json.dumps(record if bp is None else {**record, "branch_parallel": {"devices": devices, **bp}}))
    else:
        out.print(result.text, markup=False, highlight=False)
        console.print(
            f"[dim]{result.config.strategy}: {s.generated_tokens} tokens in {s.decode_forwards} decode forwards "
            f"(+{s.prefill_forwards} prefill) | TPF {s.tpf:.2f} | {s.tokens_per_s:.1f} tok/s | "
            f"{s.mean_branches:.1f} branches/forward | prefill {s.prefill_s * 1e3:.0f} ms, decode {s.decode_s:.2f} s"
            + (" | STOPPED AT ROUND CAP" if s.hit_round_cap else "") + "[/]"
        )
        if bp is not None:
            console.print(f"[dim]{_bp_line(devices, bp)}[/]")
    if trace is not None:
        record = {"config": asdict(result.config), "stats": s.as_dict(), "prompt_ids": result.prompt_ids,
                  "token_ids": result.token_ids, "trace": [asdict(step) for step in result.trace]}
        trace.write_text(json.dumps(record, indent=1))
        console.print(f"[dim]trace written to {trace}[/]")


def _bp_line(devices: int, bp: dict) -> str:
    """The Branch Parallel report: rank 0's phase times and what it sent."""
    names = ("prepare", "forward", "gather", "select", "commit")
    phases = ", ".join(f"{name} {bp[name + '_s'] * 1e3:.1f}" for name in names)
    return (f"branch parallel on {devices} ranks: ms per phase {phases} (Pre-Write inside forward: "
            f"{bp['prewrite_bytes'] / 1e6:.2f} MB) | {bp['gathers']} gathers ({bp['gather_bytes'] / 1e3:.1f} kB) | "
            f"{bp['broadcasts']} commit broadcasts, {bp['bytes_per_commit'] / 1e3:.1f} kB each")


@app.command()
def demo(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    n: int = typer.Option(8, help="Held-out problems to decode."),
    k: int = typer.Option(7, help="LoPA lookahead branches."),
    device: str = typer.Option("auto"),
) -> None:
    """Decode a few held-out math problems with threshold, d2f and lopa side by side: accuracy, TPF, speed."""
    from .config import decode_config
    from .eval.harness import markdown, run_eval
    from .eval.tasks import gsm8k

    if path is None and not (api.default_model_path() / "config.json").is_file():
        import tempfile

        from .models.tiny import write_tiny_checkpoint

        path = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="lopa-demo-")) / "tiny", hidden_size=128, num_layers=4)
        console.print(f"[yellow]The embedded default model is missing from this checkout: using a tiny RANDOM "
                      f"checkpoint written to {path}. Its answers are noise; the counts show the mechanics.[/]")
    try:
        model = api.load_model(path, runner=RunnerConfig(device=device))
        problems = gsm8k(None, n)
        configs = {name: decode_config(None, model.model_type, strategy=name, k=k, gen_length=128)
                   for name in ("threshold", "d2f", "lopa")}
        configs[f"lopa k={k}"] = configs.pop("lopa")
        reports = run_eval(model, problems, configs)
    except LopaError as err:
        _fail(err)
    out.print(f"{model.path.name}: {n} held-out problems, gen_length 128\n")
    out.print(markdown(reports, []), markup=False, soft_wrap=True)
    last = api.generate(model, problems[0].prompt, configs[f"lopa k={k}"])
    out.print(f"lopa k={k} on problem 1:\n{problems[0].prompt}{last.text}", markup=False, highlight=False)
    console.print("[dim]TPF = generated tokens (up to EOS) / decode forwards; a LoPA forward verifies all its "
                  "branches at once; prefill is counted apart. `lopa eval` runs larger comparisons.[/]")


@app.command("eval")
def evaluate(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    task: str = typer.Option("gsm8k", help="gsm8k | humaneval | code"),
    data: Optional[Path] = typer.Option(None, help="GSM8K-format JSONL (default: lopa's generated test split)."),
    n: int = typer.Option(100, help="Number of problems."),
    strategies: str = typer.Option("threshold,d2f,lopa", help="Comma-separated strategies to compare "
                                   "('published': lopa in the published code's loop, compat='published')."),
    k: str = typer.Option("7", help="LoPA k; a comma-separated list sweeps it (0 = batch verification, no lookahead)."),
    tau: str = typer.Option("", help="τ; a comma-separated list sweeps it (default: the preset's)."),
    preset: Optional[str] = typer.Option(None, help="Paper Table 5 row for every strategy."),
    gen_length: int = typer.Option(128),
    compare: Optional[str] = typer.Option(None, help="A,B: paired accuracy difference of B vs A (default: d2f vs each lopa)."),
    random_tfo: int = typer.Option(0, help="Also run N random token-filling orders per problem (lopa with a random "
                                           "winner among the same branches, seeds 0..N-1) at the first k."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for eval.json, eval.md, eval.png."),
    batch_size: int = typer.Option(1, help="Problems decoded concurrently (one forward per engine step for all)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16 | float64"),
    quantize: Optional[str] = typer.Option(None, help="Decoder Linears: int8 (weight-only) or fp8 (W8A8, fp8 GEMMs on Hopper/Ada GPUs)."),
    fuse: bool = typer.Option(True, help="On a GPU, fuse RMSNorm/RoPE/SiLU/confidence kernels with torch.compile."),
    devices: int = typer.Option(1, help="Branch Parallel: spread each request's branches over N processes/GPUs."),
) -> None:
    """Run strategies side by side on the same problems: accuracy, TPF, forwards, tokens/s; paired comparisons."""
    import datetime

    from .config import decode_config
    from .eval.harness import markdown, paired_difference, run_eval, write_reports
    from .eval.tasks import TASKS

    try:
        if task not in TASKS:
            raise ConfigError(f"task: must be one of {tuple(TASKS)}, got {task!r}")
        problems = TASKS["gsm8k"](data, n) if task == "gsm8k" else TASKS[task](n)
        model = api.load_model(path, runner=RunnerConfig(device=device, dtype=dtype, quantize=quantize, fuse=fuse,
                                                         max_num_seqs=batch_size, branch_parallel=devices))
        taus = [float(t) for t in tau.split(",") if t] or [None]
        configs = {}
        for name in strategies.split(","):
            for t in taus:
                branching = name in ("lopa", "published")
                for kk in ([int(x) for x in k.split(",")] if branching else [0]):
                    label = name + (f" k={kk}" if branching else "") + (f" tau={t}" if t is not None else "")
                    extra = {"tau": t} if t is not None else {}
                    if name == "published":
                        extra.update(strategy="lopa", compat="published")
                    configs[label] = decode_config(preset, model.model_type, **{"strategy": name, "k": kk,
                                                   "gen_length": gen_length, **extra})
        first_k = int(k.split(",")[0])
        for seed in range(random_tfo):
            configs[f"random-tfo k={first_k} seed={seed}"] = decode_config(
                preset, model.model_type, strategy="lopa", k=first_k, gen_length=gen_length,
                branch_confidence="random", seed=seed)
        if compare and (len(compare.split(",")) != 2 or not set(compare.split(",")) <= set(configs)):
            raise ConfigError(f"compare: must be two of the run labels {sorted(configs)}, got {compare!r}")
        reports = run_eval(model, problems, configs)
    except LopaError as err:
        _fail(err)
    by_label = {r.label: r for r in reports}
    if compare:
        a, b = compare.split(",")
        pairs = [paired_difference(by_label[a], by_label[b])]
    else:
        def base_for(label: str):  # the d2f run with the same τ (the first d2f, else the first run)
            tau_part = [p for p in label.split() if p.startswith("tau=")]
            match = [r for r in reports if r.label.startswith("d2f") and r.label.split()[1:] == tau_part]
            return match[0] if match else next((r for r in reports if r.label.startswith("d2f")), reports[0])

        pairs = [paired_difference(base_for(r.label), r) for r in reports
                 if r.label.startswith(("lopa", "published", "random-tfo"))]
    meta = {"model": str(model.path), "device": str(model.runner.device), "dtype": str(model.runner.dtype),
            "batch_size": batch_size, "quantize": quantize,
            "fused kernels": model.fused,
            "task": task, "data": str(data) if data else "generated test split",
            "n": len(problems), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counting": "tokens up to and including the first EOS; one decode forward per iteration however many "
                        "branches; prefill apart"}
    if devices > 1:
        meta["branch parallel"] = {"devices": devices, **model.engine.bp.as_dict()}
        console.print(_bp_line(devices, meta["branch parallel"]), markup=False, soft_wrap=True)
    model.close()
    write_reports(reports, pairs, out, meta)
    console.print(markdown(reports, pairs), markup=False, soft_wrap=True)
    console.print(f"[dim]written: {out}/eval.json, eval.md, eval.png[/]")


@app.command()
def train(
    out: Path = typer.Option(Path(TrainConfig.out), help="Where to write the model folder."),
    minutes: float = typer.Option(TrainConfig.minutes, help="Wall-clock training budget (the LR schedule follows it)."),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    lr: float = typer.Option(TrainConfig.lr),
    hidden_size: int = typer.Option(TrainConfig.hidden_size),
    num_layers: int = typer.Option(TrainConfig.num_layers),
    num_heads: int = typer.Option(TrainConfig.num_heads),
    num_kv_heads: int = typer.Option(TrainConfig.num_kv_heads),
    intermediate_size: int = typer.Option(TrainConfig.intermediate_size),
    vocab_size: int = typer.Option(TrainConfig.vocab_size),
    block_size: int = typer.Option(TrainConfig.block_size),
    full_attention_fraction: float = typer.Option(TrainConfig.full_attention_fraction),
    n_train: int = typer.Option(TrainConfig.n_train, help="Distinct math problems generated."),
    n_code: int = typer.Option(TrainConfig.n_code, help="Distinct code tasks (0: math only)."),
    code_copies: int = typer.Option(TrainConfig.code_copies, help="Times each code task appears in the pool."),
    seed: int = typer.Option(TrainConfig.seed),
    device: str = typer.Option(TrainConfig.device),
) -> None:
    """Train the default model (Dream architecture, D2F recipe) on generated math problems and code tasks."""
    from .train.trainer import train as run_training

    run_training(TrainConfig(out=str(out), minutes=minutes, batch_size=batch_size, lr=lr, hidden_size=hidden_size,
                             num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             intermediate_size=intermediate_size, vocab_size=vocab_size, block_size=block_size,
                             full_attention_fraction=full_attention_fraction, n_train=n_train, n_code=n_code,
                             code_copies=code_copies, seed=seed, device=device))


@app.command()
def info(path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model).")) -> None:
    """Show a model folder's architecture and special tokens."""
    try:
        model = api.load_model(path, runner=RunnerConfig(device="cpu", dtype="float32"))
    except LopaError as err:
        _fail(err)
    cfg = model.config
    params = sum(p.numel() for p in model.loaded.model.parameters())
    out.print(f"{model.path}\n  model_type {cfg.model_type}, {params / 1e6:.2f}M parameters")
    out.print(f"  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
              f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}")
    out.print(f"  mask id {model.loaded.spec.mask_id}, eos ids {list(model.loaded.spec.eos_ids)}")
