"""Per-request decoding settings, engine-wide runner settings, and the paper's presets as data.

Every field is validated in ``__post_init__``; a bad value raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass

from .errors import ConfigError

STRATEGIES = ("threshold", "d2f", "lopa", "dream")
K_POLICIES = ("fixed", "text", "load")
CONFIDENCES = ("prob", "neg_entropy", "margin")
ATTENTIONS = ("full", "block_causal")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
COMPATS = ("published",)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


# What each annotation accepts. bool is an int subclass in Python: refused where a number is meant, so that
# k=True or tau=False never pass for 1 and 0. Every int also passes where a float is meant.
_TYPE_TESTS = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
}


def check_types(obj) -> None:
    """Every field of a config dataclass has its annotated type ("int", "float | None", ...): ConfigError if not."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if not any(_TYPE_TESTS[k](value) for k in kinds if k != "None"):
            raise ConfigError(f"{f.name}: must be {' or '.join(kinds)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode one request. Defaults are the paper's D2F-Dream GSM8K row (Table 5).

    tau compares the max probability (Eq. 1, strict ``>``); ``confidence`` picks the measure that ranks
    positions (the top-1 fallback, lookahead candidates) and scores branches (Eq. 2).
    """

    strategy: str = "lopa"
    gen_length: int = 256  # max new tokens
    block_size: int = 32
    tau: float = 0.9  # τ_conf: fill threshold on max probability
    add_threshold: float = 0.1  # τ_add: add a block once the last one is this complete
    complete_threshold: float = 0.95  # τ_act: a block is fully active once its predecessor is this complete
    k: int = 14  # lookahead branches (lopa); K = k + 1 rows per forward
    base: str = "d2f"  # what lopa branches over: "d2f" pipelined blocks or "threshold" plain window
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    confidence: str = "prob"
    branch_confidence: str = "mean"  # branch score (decoding/confidence.py: BRANCH_SCORES); Eq. 2 is "mean"
    branch_m: int = 8  # m of the "top_m" score (m most confident positions) and "segment" (window of m columns)
    k_policy: str = "fixed"  # lookaheads per iteration (decoding/budget.py): "fixed" k, "text" (<= k, from the
    # confidence landscape), "load" (<= k, from the row budget the engine sets per step)
    attention: str | None = None  # window attention; None = the strategy's own default
    steps: int | None = None  # dream sampler: diffusion steps (None = gen_length)
    alg: str = "entropy"  # dream sampler's confidence algorithm
    max_rounds: int | None = None  # safety cap on forward rounds (None = derived from gen_length)
    trace: bool = False  # keep a per-step record (positions filled, winner, branch scores)
    compat: str | None = None  # "published": the published LoPA code's loop, token for token (decoding/published.py)

    def __post_init__(self) -> None:
        check_types(self)
        _check(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        _check(self.gen_length >= 1, "gen_length", f"must be >= 1, got {self.gen_length}")
        _check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _check(0.0 < self.tau <= 1.0, "tau", f"must be in (0, 1], got {self.tau}")
        _check(0.0 <= self.add_threshold <= 1.0, "add_threshold", f"must be in [0, 1], got {self.add_threshold}")
        _check(
            0.0 <= self.complete_threshold <= 1.0,
            "complete_threshold",
            f"must be in [0, 1], got {self.complete_threshold}",
        )
        _check(self.k >= 0, "k", f"must be >= 0, got {self.k}")
        _check(self.base in ("d2f", "threshold"), "base", f"must be 'd2f' or 'threshold', got {self.base!r}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.confidence in CONFIDENCES, "confidence", f"must be one of {CONFIDENCES}, got {self.confidence!r}")
        _check(
            self.attention is None or self.attention in ATTENTIONS,
            "attention",
            f"must be one of {ATTENTIONS} or None, got {self.attention!r}",
        )
        _check(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(self.alg in DREAM_ALGS, "alg", f"must be one of {DREAM_ALGS}, got {self.alg!r}")
        _check(self.max_rounds is None or self.max_rounds >= 1, "max_rounds", f"must be >= 1, got {self.max_rounds}")
        _check(self.compat is None or self.compat in COMPATS, "compat", f"must be None or one of {COMPATS}, got {self.compat!r}")
        if self.compat == "published":
            _check(self.strategy == "lopa", "compat", f"'published' reproduces the published LoPA loop: strategy must be "
                                                      f"'lopa', got {self.strategy!r}")
            _check(self.k != 1, "k", "the published code cannot run exactly one lookahead (its branching factor 2 "
                                     "spawns two); use k = 0 or k >= 2")
            _check(self.temperature == 0.0 and self.top_p == 1.0, "compat",
                   "'published' reproduces greedy decoding only (temperature 0, top_p 1)")
            _check(self.attention in (None, "full"), "attention", "the published loop attends fully; got "
                                                                  f"{self.attention!r}")
            _check(self.branch_confidence == "mean", "branch_confidence",
                   "the published loop scores a branch by its mean confidence; got " + repr(self.branch_confidence))
        from .decoding.confidence import BRANCH_SCORES, SCORE_MEASURES  # registry of branch-confidence functions

        _check(
            self.branch_confidence in BRANCH_SCORES,
            "branch_confidence",
            f"must be one of {tuple(BRANCH_SCORES)}, got {self.branch_confidence!r}",
        )
        measures = SCORE_MEASURES.get(self.branch_confidence, CONFIDENCES)
        _check(self.confidence in measures, "confidence", f"branch_confidence {self.branch_confidence!r} reads "
                                                          f"probabilities: needs one of {measures}, got {self.confidence!r}")
        _check(self.branch_m >= 1, "branch_m", f"must be >= 1, got {self.branch_m}")
        _check(self.k_policy in K_POLICIES, "k_policy", f"must be one of {K_POLICIES}, got {self.k_policy!r}")
        if self.compat == "published":
            _check(self.k_policy == "fixed", "k_policy", f"the published loop runs a fixed k; got {self.k_policy!r}")

    def replace(self, **changes) -> "DecodeConfig":
        """A copy with some fields changed; unknown names raise ConfigError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        _check(not unknown, "DecodeConfig", f"unknown field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def window_attention(self) -> str:
        """The attention used inside the active window: D2F keeps its block-causal mask, the rest are full."""
        if self.attention is not None:
            return self.attention
        return "block_causal" if self.strategy == "d2f" else "full"


# The paper's Table 5 (D2F-Dream rows). Each is a complete DecodeConfig; override fields with .replace().
PRESETS: dict[str, DecodeConfig] = {
    "gsm8k": DecodeConfig(block_size=32, add_threshold=0.1, complete_threshold=0.95, tau=0.90, k=14),
    "math": DecodeConfig(block_size=16, add_threshold=0.1, complete_threshold=0.95, tau=0.90, k=7),
    "humaneval": DecodeConfig(block_size=32, add_threshold=0.3, complete_threshold=0.95, tau=0.95, k=7),
    "mbpp": DecodeConfig(block_size=32, add_threshold=0.3, complete_threshold=0.95, tau=0.95, k=7),
}

# D2F-LLaDA's published settings differ from Dream's: larger blocks, later block addition, longer answers.
LLADA_DEFAULTS: dict[str, object] = dict(block_size=64, add_threshold=0.7, complete_threshold=0.95, tau=0.9, gen_length=512)


# Where one strategy needs another default than DecodeConfig's, and why. The dream sampler denoises its whole
# canvas at every step, with no cache and no stop at EOS, so the canvas length is part of what the model sees:
# on the embedded model a 256-position canvas fills with EOS from the end and the answer comes out empty
# (256 forwards for nothing), while 128 positions (steps = 128) answer the held-out problems.
STRATEGY_DEFAULTS: dict[str, dict[str, object]] = {"dream": {"gen_length": 128}}


def decode_config(preset: str | None = None, model_type: str = "dream", **overrides) -> DecodeConfig:
    """Build a DecodeConfig: a named preset (Dream) or the model family's defaults, the strategy's own
    defaults (STRATEGY_DEFAULTS), then overrides.

    With ``compat="published"`` the confidence measure defaults to the published scripts' negative entropy."""
    if preset is not None:
        _check(preset in PRESETS, "preset", f"must be one of {tuple(PRESETS)}, got {preset!r}")
        base = PRESETS[preset]
    elif model_type == "llada":
        base = DecodeConfig(**LLADA_DEFAULTS)
    else:
        base = DecodeConfig()
    for name, value in STRATEGY_DEFAULTS.get(overrides.get("strategy", base.strategy), {}).items():
        overrides.setdefault(name, value)
    if overrides.get("compat") == "published" and "confidence" not in overrides:
        overrides["confidence"] = "neg_entropy"  # the published scripts' sampling_strategy
    return base.replace(**overrides)


@dataclass(frozen=True)
class RunnerConfig:
    """Engine-wide settings: where and how the model runs."""

    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16 / float64
    cuda_graphs: bool = True  # on a GPU, replay greedy decode steps from CUDA graphs (runner/graphs.py)
    fuse: bool = True  # on a GPU, fuse RMSNorm / RoPE / SiLU·up / confidences with torch.compile (models/fused.py)
    quantize: str | None = None  # None | "int8" (weight-only) | "fp8" (W8A8 e4m3): decoder Linears (models/quant.py)
    max_num_seqs: int = 8  # requests decoded together, one forward per engine step (each holds a KV slot)
    max_positions: int | None = None  # KV positions per slot; None = grow on demand (else longer requests are refused)
    # Branch Parallel (runner/group.py): one request's branch rows spread over N processes, each holding the
    # whole model (rank r on cuda:r, or CPU processes over gloo); rank 0 spawns the others, or torchrun starts them
    branch_parallel: int = 1
    bp_commit: str = "broadcast"  # "broadcast": the winner's window K/V sent by its owner (two-phase, exact);
    #                               "local": each rank commits its own copy (single-phase; exact only if rows agree)
    bp_timeout_s: float = 60.0  # a rank silent this long during a step ends the run with BranchParallelError
    bp_check: bool = False  # debug: after each commit, check that every rank's cache and canvases agree
    step_rows: int | None = None  # query rows (sum of K*W) one decode step aims at: requests with k_policy "load"
    # share it evenly (engine/engine.py: row_budget); None = no budget (they take k)
    device_step: bool | None = None  # decode steps whose requests are all greedy threshold / d2f / lopa (no trace)
    # run the iteration for every request at once on the device (engine/device.py); False = the host
    # strategies; None = on a GPU only (on the CPU the batched update is no cheaper than the strategies' Python)

    def __post_init__(self) -> None:
        check_types(self)
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
               f"must be an integer >= 1, got {self.max_num_seqs!r}")
        _check(self.max_positions is None or (isinstance(self.max_positions, int) and self.max_positions >= 2),
               "max_positions", f"must be None or an integer >= 2, got {self.max_positions!r}")
        _check(self.step_rows is None or (isinstance(self.step_rows, int) and self.step_rows >= 1), "step_rows",
               f"must be None or an integer >= 1, got {self.step_rows!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16", "float64"), "dtype", f"unknown dtype {self.dtype!r}")
        _check(self.quantize in (None, "int8", "fp8"), "quantize", f"must be None, 'int8' or 'fp8', got {self.quantize!r}")
        _check(isinstance(self.branch_parallel, int) and self.branch_parallel >= 1, "branch_parallel",
               f"must be an integer >= 1, got {self.branch_parallel!r}")
        _check(self.bp_commit in ("broadcast", "local"), "bp_commit", f"must be 'broadcast' or 'local', got {self.bp_commit!r}")
        _check(self.bp_timeout_s > 0, "bp_timeout_s", f"must be > 0, got {self.bp_timeout_s!r}")
        _check(
            re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None,
            "device",
            f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


@dataclass(frozen=True)
class ServeConfig:
    """Settings of `lopa serve` (serve/): the HTTP side. The engine's own bounds live in RunnerConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth; else `Authorization: Bearer <key>` on /v1/* (and /metrics)
    max_pending: int = 64  # requests in flight (waiting + running) before new ones get 429
    served_model_name: str | None = None  # the `model` clients must send; None = the model folder's name
    request_timeout_s: float = 600.0  # a request still unfinished after this is aborted (HTTP 504)
    metrics_public: bool = False  # serve /metrics without the API key

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "port", f"must be in [1, 65535], got {self.port}")
        _check(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
        _check(self.max_pending >= 1, "max_pending", f"must be >= 1, got {self.max_pending}")
        _check(self.request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
