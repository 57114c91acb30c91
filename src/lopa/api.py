"""The public API: ``load_model``, ``generate`` and ``generate_many``. Front ends (CLI, eval, server) use only this."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from . import request
from .config import DecodeConfig, RunnerConfig, compiles_update, device_step_min_of
from .decoding.base import DecodeState, Step
from .engine import Engine, Sequence, Stats
from .errors import CheckpointError, ConfigError
from .models.fused import EAGER, fused_ops
from .models.loader import LoadedModel, load_folder
from .models.quant import quantize_model
from .runner import launch
from .runner.group import LocalGroup
from .runner.model_runner import ModelRunner

log = logging.getLogger("lopa")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def default_model_path() -> Path:
    """The small D2F-trained Dream-architecture model that ships inside the package."""
    return Path(str(resources.files("lopa") / "assets" / "default_model"))


@dataclass
class LopaModel:
    """A loaded model with its tokenizer, the runner that owns its device and the engine that batches requests."""

    path: Path
    loaded: LoadedModel
    runner: ModelRunner
    engine: Engine

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def config(self):
        return self.loaded.config

    @property
    def model_type(self) -> str:
        return self.loaded.config.model_type

    @property
    def fused(self) -> bool:
        """Whether the elementwise kernels run fused (RunnerConfig.fuse on a GPU where torch.compile works)."""
        return self.loaded.model.ops is not EAGER

    def close(self) -> None:
        """Stop the Branch Parallel workers (also run at exit); a no-op in one process."""
        self.runner.group.close()


@dataclass(frozen=True)
class FolderSource:
    """Where a model comes from, picklable for the Branch Parallel workers: each loads the same folder."""

    folder: Path
    adapter: Path | None = None

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        return load_folder(self.folder, device=device, dtype=dtype, adapter=self.adapter)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids up to and including the first EOS (compat "published": every generated block)
    prompt_ids: list[int]
    stats: Stats
    config: DecodeConfig
    trace: list[Step] = field(default_factory=list)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _check_quantize(scheme: str, device: torch.device, dtype: torch.dtype) -> None:
    """fp8 GEMMs on a GPU need fp8 tensor cores (compute capability 8.9+: Ada, Hopper) and a bfloat16 model
    (torch._scaled_mm with per-row scales writes bfloat16 only)."""
    if scheme != "fp8" or device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ConfigError(f"quantize: 'fp8' needs a GPU with fp8 tensor cores (compute capability 8.9+), this one is {cap}")
    if dtype != torch.bfloat16:
        raise ConfigError(f"quantize: 'fp8' on a GPU needs dtype bfloat16, got {dtype}")


WARMUP_POSITIONS = 8192  # a slot's KV positions on a GPU with the warm-up when RunnerConfig.max_positions is None


def _attention(runner: RunnerConfig, ops, device: torch.device) -> str:
    """RunnerConfig.attention resolved ("auto": flex for the warm-up, else sdpa). "flex" needs FlexAttention and,
    on a GPU, its compiled kernel (fused ops): the eager one evaluates the mask over every key (CPU tests only)."""
    available = ops.flex is not None and (device.type != "cuda" or ops is not EAGER)
    if runner.attention == "flex" and not available:
        raise ConfigError("attention: 'flex' needs torch >= 2.5 and, on a GPU, torch.compile (RunnerConfig.fuse)")
    if runner.attention == "auto":
        return "flex" if runner.warmup and available else "sdpa"
    return runner.attention


def _warm_up(runner: ModelRunner, engine: Engine, max_tokens: int) -> None:
    """Capture the static path's graph set now, then the device path's (engine/device.py) when the engine has one:
    a progress bar on a terminal, one log line."""
    bar = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True, console=Console(stderr=True))
        bar.start()
        task = bar.add_task("capturing CUDA graphs", total=None)
    paths = 2 if engine.device is not None else 1  # the device path captures the static path's (B, Qb) set again

    def progress(offset: int):
        return (lambda done, total: bar.update(task, completed=offset * total + done, total=paths * total)) if bar \
            else None

    try:
        stats = runner.warmup(max_tokens, progress(0))
        device = 0
        if stats is not None and engine.device is not None:
            device = engine.device.warmup([key[:2] for key in runner.graphs.warmup_keys(max_tokens)], progress(1))
    finally:
        if bar is not None:
            bar.stop()
    if stats is not None:
        log.info("lopa: warm-up captured %d CUDA graphs (%d of them the device path's steps) in %.1f s (%.1f s of "
                 "it in the keys that compiled %d torch.compile graphs, %.1f s in the device path's update's: "
                 "RunnerConfig.compile_update) using %.2f GiB of GPU memory (max_num_seqs %d, %d positions a slot, "
                 "max_num_batched_tokens %d)", stats.warmup_graphs, device, stats.warmup_s, stats.compiling_s,
                 stats.warmup_compiles, stats.compiling_s_of("update"), stats.warmup_bytes / 2**30,
                 runner.max_num_seqs, runner.slot_capacity(), max_tokens)


def load_model(
    path: str | Path | None = None,
    adapter: str | Path | None = None,
    runner: RunnerConfig | None = None,
) -> LopaModel:
    """Load an HF-format Dream or LLaDA folder (default: the embedded model), optionally merging a LoRA adapter.

    With ``RunnerConfig(branch_parallel=N)`` this process becomes rank 0 and starts ranks 1..N-1 (they load the
    same folder); under torchrun every rank calls load_model, and on ranks > 0 it serves rank 0's steps and then
    exits the process (SystemExit), so the code after load_model runs on rank 0 only."""
    for name, value in (("path", path), ("adapter", adapter)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{name}: must be a folder path (str or Path) or None, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            default = "the embedded model" if name == "path" else "none"
            raise ConfigError(f"{name}: must not be empty (None for {default})")
    if runner is not None and not isinstance(runner, RunnerConfig):
        raise ConfigError(f"runner: must be a RunnerConfig or None, got {type(runner).__name__} "
                          f"(RunnerConfig(**fields))")
    runner = runner or RunnerConfig()
    folder = Path(path).expanduser() if path is not None else default_model_path()
    adapter = Path(adapter).expanduser() if adapter is not None else None
    if path is None and not (folder / "config.json").is_file():
        raise CheckpointError(f"the embedded default model is missing from {folder}; pass a model folder")
    return build_model(FolderSource(folder, adapter), runner)


def build_model(source, runner: RunnerConfig, group=None, name: Path | None = None) -> LopaModel:
    """A LopaModel from any picklable ``source`` with ``load(device, dtype) -> LoadedModel`` (FolderSource;
    benchmarks build random weights). ``group``: this rank's Branch Parallel group, else made from ``runner``."""
    device = _resolve_device(runner.device)
    if group is None and runner.branch_parallel > 1:
        group = launch.start(runner.branch_parallel, device, runner.bp_timeout_s, runner.bp_commit, runner.bp_check,
                             functools.partial(build_model, source, runner))
    group = group or LocalGroup()
    device = group.device or device
    dtype = _resolve_dtype(runner.dtype, device)
    loaded = source.load(device, dtype)
    if device.type == "cuda" and runner.fuse:
        loaded.model.ops = fused_ops(device, dtype)
    if runner.quantize is not None:
        _check_quantize(runner.quantize, device, dtype)
        quantize_model(loaded.model, runner.quantize, loaded.model.ops.quantize_rows)
    static = device.type == "cuda" and runner.cuda_graphs
    attention = _attention(runner, loaded.model.ops, device)
    warm = static and runner.warmup and attention == "flex"
    model_runner = ModelRunner(loaded.model, loaded.spec, device, dtype, max_num_seqs=runner.max_num_seqs,
                               max_positions=runner.max_positions or (WARMUP_POSITIONS if warm else None),
                               static=static, fuse=loaded.model.ops is not EAGER, group=group, attention=attention,
                               kv_cache_bytes=runner.kv_cache_bytes, key_splits=runner.key_splits)
    # RunnerConfig.device_step None ("auto"): the device path where its graphs are captured at start-up
    device_step = warm if runner.device_step is None else runner.device_step
    params = sum(p.numel() for p in loaded.model.parameters())
    compiled = compiles_update(runner, model_runner.fuse, params)  # the device path's update through torch.compile
    engine = Engine(model_runner, loaded.spec, runner.max_num_seqs, runner.step_rows, runner.max_lookahead,
                    runner.max_num_batched_tokens, device_step, device_step_min_of(runner, compiled), compiled,
                    runner.flat_queries)
    if warm:
        _warm_up(model_runner, engine, runner.max_num_batched_tokens)
    model = LopaModel(name or getattr(source, "folder", Path(".")), loaded, model_runner, engine)
    if group.world > 1:
        group.ready()
    if not group.is_root:  # a worker (spawned, or started by torchrun): follow rank 0, then leave
        _serve_model(model)
        raise SystemExit(0)
    if group.world > 1:
        atexit.register(model.close)
    return model


def _serve_model(model: LopaModel) -> None:
    """A Branch Parallel worker (rank > 0): the same model and engine as rank 0, following its steps until it
    stops the group (or dies: the closed sockets end the wait)."""
    try:
        with torch.inference_mode():
            model.engine.serve_worker()
    finally:
        model.runner.group.close()


def _check_model(model) -> LopaModel:
    if not isinstance(model, LopaModel):
        raise ConfigError(f"model: must be a LopaModel from lopa.load_model(), got {type(model).__name__}")
    return model


def _check_callback(name: str, fn) -> None:
    if fn is not None and not callable(fn):
        raise ConfigError(f"{name}: must be callable or None, got {type(fn).__name__}")


def _config(model: LopaModel, config: DecodeConfig | None, preset: str | None, overrides: dict) -> DecodeConfig:
    return request.resolve_config(config, preset, overrides, model_type=model.model_type,
                                  step_rows=model.engine.step_rows, block_size=model.loaded.spec.block_size)


def _result(model: LopaModel, seq: Sequence, out) -> GenerationResult:
    return GenerationResult(model.tokenizer.decode(out.token_ids), out.token_ids, seq.prompt, out.stats, seq.config,
                            out.trace)


def generate(
    model: LopaModel,
    prompt: str | list[int] | None = None,
    config: DecodeConfig | None = None,
    *,
    messages: list[dict] | None = None,
    chat: bool = False,
    preset: str | None = None,
    on_step: Callable[[DecodeState], None] | None = None,
    **overrides,
) -> GenerationResult:
    """Decode one prompt. ``config`` (or a ``preset`` / the model family's defaults) plus field overrides.

    The prompt is text, token ids, or (instead) ``messages=[{"role": "user", "content": ...}, ...]``, rendered
    with the model's chat template (``chat=True`` does the same for a single user turn given as text)."""
    _check_model(model)
    _check_callback("on_step", on_step)
    config = _config(model, config, preset, overrides)
    ids = request.prompt_ids(model.tokenizer, model.loaded.spec, prompt, chat=chat, messages=messages)
    seq = model.engine.prepare(ids, config)
    with torch.inference_mode():
        (out,) = model.engine.generate([seq], on_step=None if on_step is None else lambda s: on_step(s.state))
    return _result(model, seq, out)


def generate_many(
    model: LopaModel,
    prompts: list[str | list[int] | list[dict]],
    configs: DecodeConfig | list[DecodeConfig] | None = None,
    *,
    chat: bool = False,
    preset: str | None = None,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    **overrides,
) -> list[GenerationResult]:
    """Decode many prompts concurrently (up to RunnerConfig.max_num_seqs at a time, one forward per engine
    step for all of them); results in the prompts' order. A prompt is text, token ids, or a chat as a list
    of message dicts (as ``generate(messages=...)``). ``configs``: one for all, or one per prompt
    (each with ``overrides`` applied). ``on_result(i, result)`` runs as each request finishes. Each result
    counts what that request alone cost (tokens, its decode forwards); the engine's counters
    (``model.engine.counters``) count the shared steps."""
    _check_model(model)
    _check_callback("on_result", on_result)
    if not isinstance(prompts, (list, tuple)):  # a str would be a list of one-character prompts
        raise ConfigError(f"prompts: must be a list of prompts, got {type(prompts).__name__} (one prompt: "
                          f"generate(model, prompt))")
    if isinstance(configs, (list, tuple)):
        if len(configs) != len(prompts):
            raise ConfigError(f"configs: {len(configs)} configs for {len(prompts)} prompts")
        cfgs = [_config(model, c, preset, dict(overrides)) for c in configs]
    else:
        cfgs = [_config(model, configs, preset, dict(overrides))] * len(prompts)

    def ids(p):  # a list of message dicts is a chat, like generate(messages=...)
        is_chat = isinstance(p, (list, tuple)) and bool(p) and isinstance(p[0], dict)
        return request.prompt_ids(model.tokenizer, model.loaded.spec, None if is_chat else p, chat=chat,
                                  messages=p if is_chat else None)

    seqs = []
    for i, (p, c) in enumerate(zip(prompts, cfgs)):
        try:
            seqs.append(model.engine.prepare(ids(p), c))
        except ConfigError as err:  # which prompt: "prompts[3]: prompt: must not be empty"
            raise ConfigError(f"prompts[{i}]: {err}") from None
    index = {s.id: i for i, s in enumerate(seqs)}
    finish = None if on_result is None else lambda s, out: on_result(index[s.id], _result(model, s, out))
    with torch.inference_mode():
        outs = model.engine.generate(seqs, on_finish=finish)
    return [_result(model, s, out) for s, out in zip(seqs, outs)]
