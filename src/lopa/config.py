"""Per-request decoding settings, engine-wide runner settings, and the paper's presets as data.

Every field is validated in ``__post_init__``; a bad value raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

from .errors import ConfigError

STRATEGIES = ("threshold", "d2f", "lopa", "dream", "sdar", "fast_dllm_v2")
BASES = ("d2f", "threshold", "sdar", "fast_dllm_v2")  # what lopa branches over
BLOCK_DIFFUSION = ("sdar", "fast_dllm_v2")  # block-diffusion loops (decoding/block_diffusion.py)
K_POLICIES = ("fixed", "text", "load")
CONFIDENCES = ("prob", "neg_entropy", "margin")
ATTENTIONS = ("full", "block_causal")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
COMPATS = ("published",)
SCORE_SPANS = ("active", "next_region")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


# What each annotation accepts. bool is an int subclass in Python: refused where a number is meant, so that
# k=True or tau=False never pass for 1 and 0. Every int also passes where a float is meant; a float must be finite
# (NaN compares false with every bound, and inf passes a lower one).
_TYPE_TESTS = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
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
            what = " or ".join("finite float" if k == "float" else k for k in kinds)
            raise ConfigError(f"{f.name}: must be {what}, got {value!r} ({type(value).__name__})")


FRONT_ENDS = ("generate", "eval", "server", "prompts_file")  # where a DecodeConfig field can be set by name
SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; one below keeps every seed a valid signed int64


def _setting(default, help: str, *, sweep: bool = False, hidden: dict[str, str] | None = None):
    """A DecodeConfig field and what every front end derives from it: ``help`` (CLI flags, docs/settings.md),
    ``sweep`` (`lopa eval` takes a comma-separated list and runs each value), ``hidden`` (front end -> why it
    does not take the field by name; every other front end does)."""
    if set(hidden or {}) - set(FRONT_ENDS):  # a typo here would silently expose the field
        raise ValueError(f"hidden: front ends are {FRONT_ENDS}, got {sorted(hidden)}")
    return field(default=default, metadata={"help": help, "sweep": sweep, "hidden": dict(hidden or {})})


_NO_TRACE = "no per-step record: "


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode one request. Defaults are the paper's D2F-Dream GSM8K row (Table 5).

    tau compares the max probability (Eq. 1, strict ``>``); ``confidence`` picks the measure that ranks
    positions (the top-1 fallback, lookahead candidates) and scores branches (Eq. 2).

    Every field is declared once here, with its help text and the front ends that take it (``_setting``):
    the CLI flags of `lopa generate` / `lopa eval`, the server's request fields, the --prompts-file JSONL
    fields and docs/settings.md are derived from these declarations (``settings(front_end)``).
    """

    strategy: str = _setting("lopa", "Decoding strategy: " + " | ".join(STRATEGIES) + ".",
                             hidden={"eval": "--strategies NAMES lists the runs to compare"})
    gen_length: int = _setting(256, "Max new tokens.",
                               hidden={"server": "OpenAI's max_tokens (max_completion_tokens in chat) sets it"})
    block_size: int = _setting(32, "Tokens per block.")
    tau: float = _setting(0.9, "τ_conf: fill a position once its max probability exceeds this, in (0, 1].",
                          sweep=True)
    add_threshold: float = _setting(0.1, "D2F τ_add: add a block once the last one is this complete, in [0, 1].")
    complete_threshold: float = _setting(0.95, "D2F τ_act: a block is fully active once its predecessor is this "
                                               "complete, in [0, 1].")
    k: int = _setting(14, "LoPA lookahead branches; K = k + 1 rows per forward (0 = no lookahead).", sweep=True)
    base: str = _setting("d2f", "What lopa branches over: d2f (pipelined blocks) | threshold (plain window) | a "
                                "block-diffusion model's own loop: sdar | fast_dllm_v2.")
    temperature: float = _setting(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = _setting(1.0, "Nucleus sampling mass, in (0, 1].")
    seed: int = _setting(0, "Sampling seed, in [0, 2^63).")
    confidence: str = _setting("prob", "Position confidence: " + " | ".join(CONFIDENCES) + ".")
    branch_confidence: str = _setting("mean", "LoPA branch score (decoding/confidence.py): mean (Eq. 2) | count | "
                                              "top_m | segment | logsum | lowest | random.", sweep=True)
    branch_m: int = _setting(8, "m of the top_m score (its m most confident positions) and of segment (a window "
                                "of m columns).")
    k_policy: str = _setting("fixed", "Lookaheads per iteration (decoding/budget.py): fixed (k) | text (<= k, from "
                                      "the confidence landscape) | load (<= k, from the engine's step row budget, "
                                      "RunnerConfig.step_rows: required).", sweep=True)
    attention: str | None = _setting(None, "Window attention: full | block_causal (default: block_causal for d2f, "
                                           "full for the others).")
    steps: int | None = _setting(None, "dream sampler: diffusion steps, at most gen_length (default: gen_length).")
    alg: str = _setting("entropy", "dream sampler's confidence: " + " | ".join(DREAM_ALGS) + ".")
    max_rounds: int | None = _setting(None, "Cap on decode forwards (default: 2 x gen_length + 8).")
    trace: bool = _setting(False, "Keep a per-step record (positions filled, winner, branch scores).", hidden={
        "generate": "--trace PATH sets it and writes the record", "eval": _NO_TRACE + "eval.json keeps every answer",
        "server": _NO_TRACE + "a response carries the text and usage",
        "prompts_file": "--trace PATH sets it for every prompt"})
    compat: str | None = _setting(None, "'published': the published LoPA code's loop, token for token (Dream "
                                        "models, lopa strategy; docs/fidelity.md).",
                                  hidden={"eval": "'published' in --strategies runs lopa with it"})
    sub_block: int = _setting(8, "fast_dllm_v2: sub-block size inside each block (filled left to right).")
    fold_commit: bool = _setting(True, "Block diffusion: commit a finished block's K/V from the forward that starts "
                                       "the next block; false = one extra forward per finished block (the published "
                                       "loops' cache update).")
    score_span: str = _setting("next_region", "LoPA over a block-diffusion loop: what a branch's score averages "
                                              "over: next_region (its unfilled positions of the active region and of "
                                              "the next region, carried in the window as masks: SDAR's next block, "
                                              "Fast-dLLM v2's next sub-block) | active (the active region's only).",
                                  sweep=True)
    verify_lookahead: bool = _setting(True, "LoPA over a block-diffusion loop: a lookahead branch competes only if "
                                            "the anchor row of the same forward predicts the token it placed.",
                                        sweep=True)

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
        _check(self.base in BASES, "base", f"must be one of {BASES}, got {self.base!r}")
        _check(self.sub_block >= 1, "sub_block", f"must be >= 1, got {self.sub_block}")
        _check(self.score_span in SCORE_SPANS, "score_span", f"must be one of {SCORE_SPANS}, got {self.score_span!r}")
        if self.block_diffusion:
            _check(self.attention in (None, "block_causal"), "attention", f"block-diffusion decoding ({self.loop}) "
                                                                          f"is block-causal; got {self.attention!r}")
            if self.loop == "fast_dllm_v2":
                _check(self.block_size % self.sub_block == 0, "sub_block",
                       f"must divide block_size {self.block_size}, got {self.sub_block}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.confidence in CONFIDENCES, "confidence", f"must be one of {CONFIDENCES}, got {self.confidence!r}")
        _check(
            self.attention is None or self.attention in ATTENTIONS,
            "attention",
            f"must be one of {ATTENTIONS} or None, got {self.attention!r}",
        )
        _check(self.steps is None or 1 <= self.steps <= self.gen_length, "steps",
               f"must be in [1, gen_length = {self.gen_length}] (a step unmasks at least one position or is a "
               f"forward for nothing), got {self.steps}")
        _check(0 <= self.seed < SEED_LIMIT, "seed", f"must be in [0, 2^63), got {self.seed}")
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
    def loop(self) -> str:
        """The decoding loop underneath: the strategy, or for lopa its base."""
        return self.base if self.strategy == "lopa" else self.strategy

    @property
    def block_diffusion(self) -> bool:
        return self.loop in BLOCK_DIFFUSION and self.compat is None

    @property
    def window_attention(self) -> str:
        """The attention used inside the active window: D2F and block diffusion are block-causal, the rest full."""
        if self.attention is not None:
            return self.attention
        return "block_causal" if self.strategy == "d2f" or self.block_diffusion else "full"


def settings(front_end: str) -> list[dataclasses.Field]:
    """The DecodeConfig fields ``front_end`` (one of FRONT_ENDS) takes by name, in declaration order."""
    _check(front_end in FRONT_ENDS, "front_end", f"must be one of {FRONT_ENDS}, got {front_end!r}")
    return [f for f in dataclasses.fields(DecodeConfig) if front_end not in f.metadata["hidden"]]


def hidden_settings(front_end: str) -> dict[str, str]:
    """DecodeConfig field -> why ``front_end`` does not take it by name (and what sets it there instead)."""
    return {f.name: f.metadata["hidden"][front_end] for f in dataclasses.fields(DecodeConfig)
            if front_end in f.metadata["hidden"]}


def base_type(f: dataclasses.Field) -> type:
    """The Python type of a field's values ("int | None" -> int)."""
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split("|")[0].strip()]


# The paper's Table 5 (D2F-Dream rows). Each is a complete DecodeConfig; override fields with .replace().
PRESETS: dict[str, DecodeConfig] = {
    "gsm8k": DecodeConfig(block_size=32, add_threshold=0.1, complete_threshold=0.95, tau=0.90, k=14),
    "math": DecodeConfig(block_size=16, add_threshold=0.1, complete_threshold=0.95, tau=0.90, k=7),
    "humaneval": DecodeConfig(block_size=32, add_threshold=0.3, complete_threshold=0.95, tau=0.95, k=7),
    "mbpp": DecodeConfig(block_size=32, add_threshold=0.3, complete_threshold=0.95, tau=0.95, k=7),
}

# The block-diffusion models' published loops. SDAR: blocks of 4, greedy, one token a step (tau 1.0: nothing
# passes "p > 1", so only the most confident mask is filled) or the dynamic threshold (every mask with p > 0.9,
# else the most confident one). Fast-dLLM v2: blocks of 32 in sub-blocks of 8, every mask with p > 0.9 and at
# least the most confident one.
PRESETS.update({
    "sdar": DecodeConfig(strategy="sdar", block_size=4, tau=1.0),
    "sdar_dynamic": DecodeConfig(strategy="sdar", block_size=4, tau=0.9),
    "fast_dllm_v2": DecodeConfig(strategy="fast_dllm_v2", block_size=32, sub_block=8, tau=0.9),
})

# D2F-LLaDA's published settings differ from Dream's: larger blocks, later block addition, longer answers.
LLADA_DEFAULTS: dict[str, object] = dict(block_size=64, add_threshold=0.7, complete_threshold=0.95, tau=0.9, gen_length=512)
# Without a preset, a block-diffusion model runs LoPA over its own loop (the block size is the model's own:
# api.py takes it from the checkpoint). SDAR's blocks of 4 hold at most 3 other masks to look ahead at.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llada": LLADA_DEFAULTS,
    "sdar": dict(strategy="lopa", base="sdar", block_size=4, tau=0.9, k=3),
    "fast_dllm_v2": dict(strategy="lopa", base="fast_dllm_v2", block_size=32, sub_block=8, tau=0.9, k=7),
}


# Where one strategy needs another default than DecodeConfig's, and why. The dream sampler denoises its whole
# canvas at every step, with no cache and no stop at EOS, so the canvas length is part of what the model sees:
# on the embedded model a 256-position canvas fills with EOS from the end and the answer comes out empty
# (256 forwards for nothing), while 128 positions (steps = 128) answer the held-out problems.
STRATEGY_DEFAULTS: dict[str, dict[str, object]] = {"dream": {"gen_length": 128}}
MODEL_TYPES = ("dream", "llada", "sdar", "fast_dllm_v2")


def decode_config(preset: str | None = None, model_type: str = "dream", **overrides) -> DecodeConfig:
    """Build a DecodeConfig: a named preset (Dream) or the model family's defaults, the strategy's own
    defaults (STRATEGY_DEFAULTS), then overrides.

    With ``compat="published"`` the confidence measure defaults to the published scripts' negative entropy."""
    _check(model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}, got {model_type!r}")
    if preset is not None:
        _check(isinstance(preset, str) and preset in PRESETS, "preset",
               f"must be one of {tuple(PRESETS)}, got {preset!r}")
        base = PRESETS[preset]
    elif model_type in FAMILY_DEFAULTS:
        base = DecodeConfig(**FAMILY_DEFAULTS[model_type])
    else:
        base = DecodeConfig()
    strategy = overrides.get("strategy", base.strategy)  # any type: DecodeConfig names a wrong one
    for name, value in (STRATEGY_DEFAULTS.get(strategy, {}) if isinstance(strategy, str) else {}).items():
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
    fuse: bool = True  # on a GPU, fuse RMSNorm / RoPE / SiLU·up / confidences (models/fused.py) and the device path's
    # update (engine/device.py) with torch.compile
    # Where the runner fuses, compile the device path's update too (engine/device.py: compiled_update): one H100, 32
    # lopa requests, 0.26 against 1.18 ms of update a step; the embedded model's steps 1.2-1.8x faster. Its
    # compiles cost a machine's first start about 45 s whatever the model (kernels cached on disk for later starts):
    # Dream-7B shape on one H100, a first start's warm-up 82.5 s against 50.0 s with it eager (docs/benchmarks.md).
    # None ("auto", compiles_update) = compiled for models under COMPILE_UPDATE_MAX_PARAMS parameters, eager above;
    # True / False: compiled / eager for every model
    compile_update: bool | None = None
    quantize: str | None = None  # None | "int8" (weight-only) | "fp8" (W8A8 e4m3): decoder Linears (models/quant.py)
    max_num_seqs: int = 8  # requests decoded together, one forward per engine step (each holds a KV slot)
    max_positions: int | None = None  # KV positions per slot (longer requests are refused); None = grow on demand,
    # except on a GPU with the warm-up: 8192 (a fixed pool, which the captured graphs read)
    # Branch Parallel (runner/group.py): one request's branch rows spread over N processes, each holding the
    # whole model (rank r on cuda:r, or CPU processes over gloo); rank 0 spawns the others, or torchrun starts them
    branch_parallel: int = 1
    bp_commit: str = "broadcast"  # "broadcast": the winner's window K/V sent by its owner (two-phase, exact);
    #                               "local": each rank commits its own copy (single-phase; exact only if rows agree)
    bp_timeout_s: float = 60.0  # a rank silent this long during a step ends the run with BranchParallelError
    bp_check: bool = False  # debug: after each commit, check that every rank's cache and canvases agree
    step_rows: int | None = None  # query rows (sum of K*W) one decode step aims at: requests with k_policy "load"
    # share it evenly (engine/engine.py: row_budget); None = no budget (they take k)
    # Admission bounds (engine/engine.py: Engine.prepare refuses a request that cannot fit, before it queues):
    max_lookahead: int = 64  # ceiling on a request's k (4x the paper's largest, 14-15; 2 blocks of 32 candidates)
    max_num_batched_tokens: int = 8192  # query positions (K*W) of one request's decode forward: a request whose
    # largest forward, K x gen_length (dream: prompt + gen_length), exceeds it is refused (a step's total is at most
    # max_num_seqs times it). 8192 = (15+1) x 512: the presets at k <= 15 and gen_length <= 512. The warm-up
    # captures the static steps of at most this many padded queries (B bucket x Qb); after it a decode step takes
    # the first running requests that fit them and the others wait a step (engine/scheduler.py: the step budget),
    # a larger prefill step runs as several warmed forwards (eagerly only for a prompt longer than the largest
    # query bucket within this bound)
    kv_cache_bytes: int | None = None  # KV pool budget; None = derived when the model loads (runner/memory.py:
    # a quarter of physical RAM on a CPU, half the GPU memory the weights leave); requests wait for room
    # On a GPU, capture every static-path graph (B bucket x query bucket, up to max_num_seqs and
    # max_num_batched_tokens) inside load_model, so nothing captures or compiles while requests run; prompt
    # prefills run on the same shapes (each prompt padded to a query bucket). Start-up time and GPU memory are
    # logged (H200, embedded model, max_num_seqs 8: 146 graphs in 71 s, 1.7 GiB; 18 s on a second start on the
    # same machine, which reuses torch's on-disk kernel caches). False: each shape captures on first
    # use (fast start; every new shape, prompt lengths included, costs ~1-2 s while requests wait). `lopa serve`
    # turns it on
    warmup: bool = False
    # The static path's attention (runner/graphs.py): "flex" = FlexAttention over each request's real key span,
    # graphs independent of the prompt length (what the warm-up needs); "sdpa" = SDPA with an additive mask over the
    # padded span (faster steps, measured in docs/benchmarks.md, but graphs keyed by the span); "auto" = flex with
    # the warm-up, else sdpa
    attention: str = "auto"
    # "flex": a step whose FlexAttention leaves most of the GPU idle (one request at Dream-7B shape and k = 0 runs 8
    # programs on an H100's 132) has its keys cut into chunks that run side by side and are merged (models/attention.py:
    # split_attention; the rule: key_splits). One H100, Dream-7B shape, one request at k = 0: a step 1.69x faster at
    # an 8,192-token prefix, 1.16x at 2,048; the mixed cold-start workload unchanged (110.8 against 111.3 ms a step),
    # the first start's warm-up +3.7 s (two more compiles). Short prompts pay the merge: about 16 us a layer at 512
    # (docs/benchmarks.md). None ("auto") = that rule (a CPU never splits); 1 = never; N = every "flex" step in N
    # chunks (tests)
    key_splits: int | None = None
    # Decode steps whose requests are all greedy threshold / d2f / lopa (no trace) run the iteration for every
    # request at once on the device (engine/device.py), host work flat in the batch; False = the host strategies.
    # None ("auto") = on where its CUDA graphs are captured at start-up (a GPU with the warm-up: "flex" graphs keyed
    # by buckets only, so it is fast from the first request), else off: without the warm-up its graphs are captured
    # while serving, and on a CPU the batched update costs about what the strategies' Python does
    # (docs/benchmarks.md). True forces it on (lazily captured graphs on a GPU, eager ops on a CPU)
    device_step: bool | None = None
    # With the device path on, a decode step takes it only while at least this many requests are running; with
    # fewer, the host strategies run the step (their requests come back from the device, and go again when enough
    # run). None ("auto", device_step_min_of) = 1 where the update is compiled (fuse on a GPU and compiles_update:
    # faster than the host strategies from one request on), DEVICE_STEP_MIN_UNFUSED where device_step is auto and
    # it is not, 1 where device_step=True forces the path on. 1 = whenever the device path is on
    device_step_min: int | None = None
    # The device path's forward on the flat query axis (docs/architecture.md): the requests' queries back to back,
    # not padded to the widest one's, for the projections, norms, MLP and head (the attention stays on the padded
    # rows). A step of at least FLAT_MIN padded queries (engine/device.py) takes it when its real queries fit half or
    # three quarters of them; the warm-up captures each such (B, Qb) key at both counts too: more graphs, more
    # start-up time. Off by default: on one H100 its forward is 1.41x faster at Dream-7B shape but no faster at the
    # embedded model's, and its engine cost at Dream-7B shape is not yet measured (docs/benchmarks.md)
    flat_queries: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
               f"must be an integer >= 1, got {self.max_num_seqs!r}")
        _check(self.max_positions is None or (isinstance(self.max_positions, int) and self.max_positions >= 2),
               "max_positions", f"must be None or an integer >= 2, got {self.max_positions!r}")
        _check(self.step_rows is None or (isinstance(self.step_rows, int) and self.step_rows >= 1), "step_rows",
               f"must be None or an integer >= 1, got {self.step_rows!r}")
        _check(self.max_lookahead >= 0, "max_lookahead", f"must be >= 0, got {self.max_lookahead!r}")
        _check(self.device_step_min is None or self.device_step_min >= 1, "device_step_min",
               f"must be None or >= 1, got {self.device_step_min!r}")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               f"must be >= 1, got {self.max_num_batched_tokens!r}")
        _check(self.kv_cache_bytes is None or self.kv_cache_bytes >= 1, "kv_cache_bytes",
               f"must be None or >= 1, got {self.kv_cache_bytes!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16", "float64"), "dtype", f"unknown dtype {self.dtype!r}")
        _check(self.quantize in (None, "int8", "fp8"), "quantize", f"must be None, 'int8' or 'fp8', got {self.quantize!r}")
        _check(isinstance(self.branch_parallel, int) and self.branch_parallel >= 1, "branch_parallel",
               f"must be an integer >= 1, got {self.branch_parallel!r}")
        _check(self.bp_commit in ("broadcast", "local"), "bp_commit", f"must be 'broadcast' or 'local', got {self.bp_commit!r}")
        _check(self.bp_timeout_s > 0, "bp_timeout_s", f"must be > 0, got {self.bp_timeout_s!r}")
        _check(self.key_splits is None or (isinstance(self.key_splits, int) and self.key_splits >= 1), "key_splits",
               f"must be None or an integer >= 1, got {self.key_splits!r}")
        _check(self.attention in ("auto", "flex", "sdpa"), "attention",
               f"must be 'auto', 'flex' or 'sdpa', got {self.attention!r}")
        _check(
            re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None,
            "device",
            f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


# RunnerConfig.device_step_min's "auto" value where the device path's update runs unfused: on one H100 (default
# model, 64 x 64 attention tiles, the eager update) one or two running requests step faster on the host strategies
# (lopa k=7: 1.15 / 1.62 ms against 1.61 / 1.81), three are about even (2.05 / 1.91; d2f 1.42 / 1.46) and from four
# on the device path is faster (docs/benchmarks.md). Compiled, the update is faster from one request on (auto: 1)
DEVICE_STEP_MIN_UNFUSED = 3


# compile_update "auto": the update is compiled for models under this many parameters. What it saves a step (~0.7 ms
# on an H100, about the same for every model) is up to half of the embedded model's step but about 5% of one
# Dream-7B request's (14 ms) and under 1% of 32 requests' (~200 ms), while its compile costs any model about the
# same ~35-45 s of a first start: at Dream-7B shape 82.5 against 50.0 s of warm-up for steps 0.6-1.1% faster (one
# H100, docs/benchmarks.md)
COMPILE_UPDATE_MAX_PARAMS = 5_000_000_000


def compiles_update(runner: RunnerConfig, fused: bool, params: int) -> bool:
    """Whether the device path's update runs through torch.compile: never where the runner does not fuse (a CPU,
    fuse=False); else RunnerConfig.compile_update, None ("auto") = a model of fewer than COMPILE_UPDATE_MAX_PARAMS
    ``params``."""
    if not fused:
        return False
    if runner.compile_update is None:
        return params < COMPILE_UPDATE_MAX_PARAMS
    return runner.compile_update


def device_step_min_of(runner: RunnerConfig, compiled: bool) -> int:
    """The fewest running requests that take the device path: RunnerConfig.device_step_min, or for None 1 where
    the update is ``compiled`` (faster than the host strategies at every n, H100) or device_step=True forces the path
    on, else DEVICE_STEP_MIN_UNFUSED."""
    if runner.device_step_min is not None:
        return runner.device_step_min
    return 1 if compiled or runner.device_step is not None else DEVICE_STEP_MIN_UNFUSED


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
        check_types(self)
        _check(1 <= self.port <= 65535, "port", f"must be in [1, 65535], got {self.port}")
        _check(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
        _check(self.served_model_name is None or self.served_model_name.strip() != "", "served_model_name",
               "must not be empty")
        _check(self.max_pending >= 1, "max_pending", f"must be >= 1, got {self.max_pending}")
        _check(self.request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
