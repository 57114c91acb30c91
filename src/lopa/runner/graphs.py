"""The static path: a decode step on bucketed shapes, replayed from CUDA graphs, one graph per shape key.

An eager LoPA iteration at Dream-7B size is launch-bound (hundreds of small kernels). Here a decode step
over B running requests runs on static buffers instead: B is rounded up to a bucket (padding rows are all
padding queries over free slots) and each request row to a bucket of Qb queries; positions, write slots and
the mask are built inside the graph from the packed step (runner/step.py), and the K/V pool is allocated
once, so buffer addresses never change. A step sends ONE host-to-device copy and reads back ONE packed
[B, Qb, 3] tensor of predictions. One captured graph serves every step with the same key.

Attention (RunnerConfig.attention):
* "flex": FlexAttention over each slot's WHOLE capacity with a block mask built on the device from the
  step's committed lengths (models/attention.py: step_block_mask), so the kernel reads each request's real
  key span and the key is (B bucket, Qb bucket, measures, suppressed ids): nothing that changes with the
  prompt or the prefix. On a GPU ``warmup`` captures every key up to the runner's limits at start-up; after
  that a step whose key was not captured runs eagerly (counted in ``stats.eager_steps``), never captures, and
  the scheduler forms decode steps whose (B bucket, Qb) was warmed (``shapes``; ModelRunner.decode_take).
* "sdpa": SDPA with an additive mask over the first Lb positions of the slots, Lb = prefix + queries rounded
  to KEY_STEP: Lb is part of the key, so new prompt lengths capture new graphs (the path before start-up
  capture, kept for comparison and for torch without FlexAttention).

Greedy requests only (temperature 0, top_p 1): steps with a sampled request and cache-less windows run eagerly.
Prefill steps (under "flex") run here too, on the same keys: each prompt is one row of query bucket Qb >= its
length (padding queries are masked and write only the slot's trash position), so the warm-up's kernels serve
them and no prompt length meets a new shape. A prefill over slots 0.. replays the key's graph. One over slots
first.. (requests already running below it) replays the warmed graph of slots 0..first + n - 1 with the prompts
at rows first.. and the rows below all padding (their queries write only each running slot's trash position),
when that graph exists and its extra rows cost at most PAD_FLOPS; else it runs the same body on the warmed
shapes without a graph (the graph's slot addresses start at 0): its bucket's rows are laid over slots
[start, start + B) with the prompts at rows first - start.., the other rows all padding. A prefill step with no
warmed key is split into contiguous groups that have one (several forwards); one whose prompt alone has none
(longer than the largest query bucket that fits max_num_batched_tokens) runs eagerly with exact shapes, counted
in ``eager_prefills``.
On a CPU the same path runs without capture (the tests check it against eager), writing into each key's outputs
in place as a replay does, so a view of them kept past the next run of the key goes stale there too.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

import torch

from ..decoding.base import Predictions
from ..decoding.confidence import measure_confidence
from ..models.fused import size_oblivious
from .step import FIELDS, StepItem, pack, split

ROW_STEP = 32  # "sdpa": request rows padded to a multiple of this many queries
KEY_STEP = 256  # KV slot capacities and key spans are multiples of this many positions
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# "flex": request rows padded to one of these query counts (at most 1.5x the real count past 32)
QUERY_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
MAX_GRAPHS = 256  # lazily captured graphs kept; past this all are dropped and recaptured on demand
# The padded work (2 x parameters x padded queries) a prefill over slots first.. may add to replay the warmed graph
# of slots 0.. instead of running its body eagerly (launches and Python: a few ms a step on a GPU). An estimate, not
# yet measured: the embedded model (7M parameters) always replays; a 7B model only for a few padded queries
PAD_FLOPS = 2e12


def round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def bucket(n: int, slots: int) -> int:
    """The smallest bucket >= n, within the pool's slots (the pool size is always the last bucket)."""
    return min(next((b for b in BUCKETS if b >= n), n), slots)


def query_bucket(q: int) -> int:
    return next((b for b in QUERY_BUCKETS if b >= q), round_up(q, QUERY_BUCKETS[-1]))


def warmup_shapes(slots: int, capacity: int, max_tokens: int) -> list[tuple[int, int]]:
    """(B bucket, query bucket) of every key the warm-up captures for a pool of ``slots`` slots of ``capacity``
    positions, B x Qb <= ``max_tokens``, in its order (GraphExecutor.warmup_keys)."""
    Bs = sorted({bucket(n, slots) for n in range(1, slots + 1)})
    return [(B, Qb) for B in Bs for Qb in QUERY_BUCKETS if B * Qb <= max_tokens and Qb < capacity]


def largest_first(keys: list[tuple]) -> list[tuple]:
    """The warm-up's order: the key of the most queries (B x Qb; ties to the larger B) first, then the rest as given.
    The compiled elementwise chains are dynamic in their rows, and Inductor tunes each generated kernel's launch at
    its first call: first called at 1 x 32 rows, the chains ran up to 2x slower at 32 x 256 than first called there
    (H100, benchmarks/chain_tuning.py). The smaller captures then also reuse the largest one's blocks in the shared
    graph pool (Dream-7B shape: 0.86 instead of 4.80 GiB; docs/benchmarks.md, twelfth session)."""
    if not keys:
        return []
    first = max(keys, key=lambda key: (key[0] * key[1], key[0]))
    return [first] + [key for key in keys if key != first]


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool):
    """torch.cuda.graph with Python's cyclic garbage collector held off. A collection inside a capture may free an
    earlier model's CUDA graphs (a dropped model in a reference cycle): destroying a graph is not permitted while a
    stream captures, and it invalidated the capture (seen on an H100: a second load_model's warm-up failed with
    "operation failed due to a previous error during capture"). torch.cuda.graph collects first only under
    torch.compiler.config.force_cudagraph_gc (off by default), so a warm-up collects once before its first capture
    (GraphExecutor.measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()


def compiles() -> int:
    """Graphs torch.compile has compiled in this process so far (recompiles included)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@dataclass
class GraphStats:
    captures: int = 0  # CUDA graphs captured (each costs a warm-up body and a capture)
    captures_after_start: int = 0  # ... after start-up (the warm-up, or the runner's creation without one)
    recompiles_after_start: int = 0  # torch.compile graphs compiled since then, anywhere in the process
    eager_steps: int = 0  # greedy decode steps that ran eagerly after the warm-up: their key was not captured
    eager_prefills: int = 0  # prefill steps that ran eagerly with exact shapes after the warm-up (no warmed key)
    warmup_s: float = 0.0
    warmup_graphs: int = 0
    warmup_bytes: int = 0  # GPU memory the warm-up took (graph pools, static buffers), measured
    warmup_compiles: int = 0  # torch.compile graphs compiled during the warm-up (process-wide)
    warmup_key_s: list[float] = field(default_factory=list)  # seconds per warmed key, in warm-up order
    warmup_key_compiles: list[int] = field(default_factory=list)  # torch.compile graphs compiled per warmed key
    warmup_key_names: list[str] = field(default_factory=list)  # "forward B=1 Qb=32" or "update ...", the same order

    @property
    def compiling_s(self) -> float:
        """Seconds of the warmed keys that compiled a torch.compile graph."""
        return self.compiling_s_of("")

    def compiling_s_of(self, path: str) -> float:
        """compiling_s of one path's keys: "forward" (this one's) or "update" (the device path's); "" both (every
        timed key is named: GraphExecutor.timed_key)."""
        return sum(t for t, c, name in zip(self.warmup_key_s, self.warmup_key_compiles, self.warmup_key_names)
                   if c and name.startswith(path))


def _static_vocab(fn):
    """A compiled predict, dynamic in B and Qb (one kernel for every bucket, B = 1 included) but specialized on
    the vocabulary."""
    def call(logits: torch.Tensor, *args):
        torch._dynamo.mark_static(logits, logits.dim() - 1)
        # the per-row fields as fresh tensors, not views into the packed step: torch.compile guards on a view's
        # offset and strides, which change with B and Qb
        args = [a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a for a in args]
        with size_oblivious():
            return fn(logits, *args)
    return call


def predict_rows(logits: torch.Tensor, measure: torch.Tensor, suppress: torch.Tensor, measures: tuple[str, ...],
                 suppress_ids: tuple[int, ...]) -> torch.Tensor:
    """Greedy predict (decoding/confidence.py) for every query of a step, each request row with its own
    measure and suppression. logits [B, Qb, V] -> [B, Qb, 3]: token id, its probability, its confidence."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    if suppress_ids:  # a mask over the vocabulary, not writes into columns (whose views made compiles guard on B);
        # built from scalars: no host-to-device copy, which a CUDA graph capture would refuse
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        banned = vocab == suppress_ids[0]  # [V]
        for token in suppress_ids[1:]:
            banned = banned | (vocab == token)
        logits.masked_fill_(suppress[:, None, None].bool() & banned, float("-inf"))  # in place: one copy in all
    probs = torch.softmax(logits, dim=-1)
    tokens = probs.argmax(-1)
    chosen = probs.gather(-1, tokens[..., None])[..., 0]
    conf = chosen
    for i, name in enumerate(measures):
        if name != "prob":
            conf = torch.where((measure == i)[:, None], measure_confidence(probs, chosen, name), conf)
    return torch.stack([tokens.to(chosen.dtype), chosen, conf], dim=-1)


@dataclass
class Static:
    host: torch.Tensor  # [B, 4*Qb + 3] int64 (pinned on a GPU): the packed step
    inputs: torch.Tensor  # the same on the device, one copy per step; the graph reads only this
    Lb: int
    graph: torch.cuda.CUDAGraph | None = None
    out: tuple | None = None  # (hidden [B, Qb, E], packed predictions [B, Qb, 3]) on the device


class GraphExecutor:
    def __init__(self, runner, capture: bool, fuse: bool = False, attention: str = "sdpa") -> None:
        self.runner = runner
        self.capture = capture
        self.attention = attention  # "flex" | "sdpa" (module docstring)
        # fuse: softmax, argmax and confidence over the step's logits in one compiled pass (models/fused.py),
        # one kernel for every bucket
        self.predict = _static_vocab(torch.compile(predict_rows, fullgraph=True, dynamic=True)) if fuse else predict_rows
        self.statics: dict[tuple, Static] = {}
        self.params = sum(p.numel() for p in runner.model.parameters())  # what a padded query costs (PAD_FLOPS)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.frozen = False  # after warmup(): no capture while serving; an uncaptured key runs eagerly
        self.shapes: set[tuple[int, int]] = set()  # (B bucket, Qb) of the warmed keys (the decode steps' budget)
        self.stats = GraphStats()
        self._at_start = (0, compiles())  # (captures, compiles) when start-up ended: now, until a warm-up
        self._compiled0 = self._at_start[1]  # compiles() when the warm-up began

    def clear(self) -> None:
        """Drop every graph (the KV pool they read was replaced); later captures go into a fresh graph pool."""
        if self.frozen:
            raise RuntimeError("the KV pool was replaced after the start-up warm-up (its graphs read the old one)")
        self.statics.clear()
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _suppress(self, items: list[StepItem]) -> tuple[int, ...] | None:
        """The suppressed ids of the step's key: the model's mask id whenever no request suppresses others (rows
        that suppress nothing carry flag 0), so one key serves both; None: two different sets (eager). A request
        that asks for no prediction (a plain prompt prefill) plays no part."""
        sets = {item.pspec.suppress_ids for item in items if item.batch.logit_cols.numel()} - {()}
        default = (self.runner.spec.mask_id,)
        return default if sets <= {default} else (next(iter(sets)) if len(sets) == 1 else None)

    def supports(self, items: list[StepItem]) -> bool:
        if self._suppress(items) is None:
            return False
        if all(item.batch.prefill for item in items):
            return self.attention == "flex" and all(item.batch.start == 0 and self._predicts_greedy(item, True)
                                                    for item in items)
        return items[0].slot == 0 and all(self._predicts_greedy(item) and not item.batch.prefill
                                          and item.batch.start > 0 for item in items)

    def _predicts_greedy(self, item: StepItem, prefill: bool = False) -> bool:
        """Whether the batched greedy predict gives this request's predictions: it is greedy, or (a prompt prefill
        in one process) it asks for none. Under Branch Parallel a sampled row lives on rank 0 only."""
        asks_none = prefill and not item.batch.logit_cols.numel() and not self.runner.group.distributed
        return item.pspec.greedy or asks_none

    def plan(self, items: list[StepItem], queries: int | None = None) -> list[list[StepItem]]:
        """The static forwards this step takes: [items] when it runs on the static path (its graph exists or may
        still be captured); after the warm-up, a prefill whose key was not warmed split into contiguous groups
        that each have a warmed key; [] when it runs eagerly (after the warm-up: counted), so nothing captures
        while serving."""
        if not self.supports(items):
            return []
        if not self.frozen or self.key(items, queries) in self.statics:
            return [items]
        if items[0].batch.prefill:
            groups = self._split(items)
            if groups:
                return groups
            self.stats.eager_prefills += 1
        else:
            self.stats.eager_steps += 1
        return []

    def _split(self, items: list[StepItem]) -> list[list[StepItem]] | None:
        """Contiguous groups of a prefill step, each as large as a warmed key allows (several long prompts
        admitted at once); None when one prompt alone has no warmed key (it is longer than the largest query
        bucket that fits max_num_batched_tokens)."""
        groups: list[list[StepItem]] = []
        for item in items:
            if groups and self.key(groups[-1] + [item]) in self.statics:
                groups[-1].append(item)
            elif self.key([item]) in self.statics:
                groups.append([item])
            else:
                return None
        return groups

    def key(self, items: list[StepItem], queries: int | None = None) -> tuple:
        """(B bucket, Qb, Lb, measures, suppressed ids). ``queries``: the most queries of a request row on any rank
        (Branch Parallel: every rank packs the same Qb, so the step's predictions gather as one [N, B, Qb, 3]
        tensor); default: these items'. Under "flex" Lb is the slot capacity: no key depends on a length.
        Requests that ask for no prediction add no measure (a prompt prefill: the warmed "prob" key serves it)."""
        pool = self.runner.pool
        B = bucket(len(items), pool.slots)
        q = queries or max(item.queries for item in items)
        measures = tuple(sorted({item.pspec.measure for item in items if item.batch.logit_cols.numel()})) or ("prob",)
        if self.attention == "flex":
            return B, self.bucket_queries(q), pool.capacity, measures, self._suppress(items)
        Lb = min(round_up(max(item.batch.start + item.queries for item in items), KEY_STEP), pool.capacity)
        return B, self.bucket_queries(q), Lb, measures, self._suppress(items)

    def bucket_queries(self, queries: int) -> int:
        """Qb of a request row of ``queries`` queries: a query bucket ("flex"), or a multiple of ROW_STEP."""
        return query_bucket(queries) if self.attention == "flex" else round_up(queries, ROW_STEP)

    def warmed(self, n: int, queries: int) -> bool:
        """Whether the warm-up captured the shape of a step of n requests whose longest row has ``queries`` queries
        (for the default measure; engine/scheduler.py forms decode steps that have one)."""
        return (bucket(n, self.runner.pool.slots), query_bucket(queries)) in self.shapes

    def warmup_keys(self, max_tokens: int, measures: tuple[str, ...] = ("prob",)) -> list[tuple]:
        """Every "flex" key a step of at most ``max_tokens`` padded queries (B bucket x Qb) can have."""
        pool = self.runner.pool
        suppress = (self.runner.spec.mask_id,)
        return [(B, Qb, pool.capacity, measures, suppress) for B, Qb in warmup_shapes(pool.slots, pool.capacity,
                                                                                       max_tokens)]

    @torch.inference_mode()  # the mode every step runs in, so compiled guards match later steps
    def warmup(self, keys: list[tuple], on_graph=None) -> GraphStats:
        """Capture (or, without capture, run once) every key now; afterwards nothing captures. The pool must be
        at its final size. ``on_graph(done, total)`` after each key (progress bars)."""
        self._compiled0 = compiles()
        self.shapes |= {key[:2] for key in keys}
        with self.measured(len(keys)):
            for done, key in enumerate(largest_first(keys), 1):
                self._warm_key(key)
                if on_graph is not None:
                    on_graph(done, len(keys))
        return self.started()

    def _warm_key(self, key: tuple) -> None:
        """Capture (or run once) one key, timed with the compiles it took."""
        with self.timed_key(f"forward B={key[0]} Qb={key[1]}"):
            if key not in self.statics:
                st = self._new(key)
                pack([], st.host, self.runner.spec.mask_id)  # all padding: only the shapes matter
                st.inputs.copy_(st.host)
                if self.capture:
                    self._capture(st, key[3], key[4])
                else:
                    st.out = self._body(st.inputs, 0, st.Lb, key[3], key[4])

    @contextlib.contextmanager
    def timed_key(self, name: str):
        """One warmed key's seconds and torch.compile graphs into the stats, under ``name`` (this path's keys, then
        the device path's: engine/device.py)."""
        t, c = time.perf_counter(), compiles()
        yield
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        self.stats.warmup_key_s.append(time.perf_counter() - t)
        self.stats.warmup_key_compiles.append(compiles() - c)
        self.stats.warmup_key_names.append(name)

    @contextlib.contextmanager
    def measured(self, graphs: int):
        """Add a warm-up of ``graphs`` graphs to the stats: its seconds and the GPU memory it took (the device
        path's warm-up, engine/device.py, follows this one's and adds its own). On a GPU garbage is collected
        first (see capturing)."""
        cuda = self.runner.device.type == "cuda"
        if cuda:
            gc.collect()  # garbage holding CUDA graphs goes now, not inside a capture (capturing)
            torch.cuda.synchronize(self.runner.device)
            free0 = torch.cuda.mem_get_info(self.runner.device)[0]
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.runner.device)
            self.stats.warmup_bytes += max(0, free0 - torch.cuda.mem_get_info(self.runner.device)[0])
        self.stats.warmup_s += time.perf_counter() - t0
        self.stats.warmup_graphs += graphs

    def started(self) -> GraphStats:
        """Start-up ends now: nothing captures from here on, compiled calls stop setting up compiles (Ops.settle),
        and the after-start counters count from here (the device path's warm-up, engine/device.py, calls it again
        after capturing its own graphs, so its compiles count in ``warmup_compiles`` too)."""
        self.stats.warmup_compiles = compiles() - self._compiled0
        self.runner.model.ops.settle()
        self.frozen = True
        self._at_start = (self.stats.captures, compiles())
        return self.refresh_stats()

    def refresh_stats(self) -> GraphStats:
        """The counters after start-up, brought up to date (compiles are counted process-wide)."""
        self.stats.captures_after_start = self.stats.captures - self._at_start[0]
        self.stats.recompiles_after_start = compiles() - self._at_start[1]
        return self.stats

    def _new(self, key: tuple) -> Static:
        B, Qb, Lb = key[:3]
        cuda = self.runner.device.type == "cuda"
        host = torch.zeros(B, FIELDS * Qb + 3, dtype=torch.long, pin_memory=cuda)
        st = self.statics[key] = Static(host, torch.zeros_like(host, device=self.runner.device), Lb)
        return st

    def run(self, items: list[StepItem], layouts: list[list[range]] | None = None,
            queries: int | None = None) -> tuple[torch.Tensor, list[Predictions]]:
        """``items``: this rank's rows of each request; ``layouts``: which rank computed which of their rows (the
        group's split; None: all here). The group gathers every rank's predictions (Branch Parallel: on the
        device) with the step's one device-to-host copy. ``queries``: as for ``key``."""
        key = self.key(items, queries)
        row = items[0].slot  # > 0: a prefill over slots first.. (module docstring)
        if row:
            wide = self._from_zero(items, key)
            if wide is None:  # no graph of slots 0.. to lay it into
                return self._run_at(items, key)
            key = wide
        _, _, _, measures, suppress = key
        st = self.statics.get(key)
        fresh = st is None
        if fresh:
            if self.frozen:
                raise RuntimeError(f"static key {key} was not captured at start-up (plan() routes it eagerly)")
            if len(self.statics) >= MAX_GRAPHS:  # lazy capture only: the warm-up keeps its whole set
                self.clear()
            st = self._new(key)
        pack(items, st.host, self.runner.spec.mask_id, measures, suppress, row=row)
        st.inputs.copy_(st.host, non_blocking=True)  # safe: the previous step's results were read (synced)
        if not self.capture:  # into the key's outputs in place, as a replay writes (what a view of them sees)
            out = self._body(st.inputs, 0, st.Lb, measures, suppress)
            st.out = out if st.out is None else tuple(o.copy_(x) for o, x in zip(st.out, out))
        elif fresh:
            self._capture(st, measures, suppress)
        else:
            st.graph.replay()
        hidden, packed = st.out
        hidden, packed = hidden[row:row + len(items)], packed[row:row + len(items)]  # the step's own rows
        preds = [Predictions(*p) for p in split(self.runner.group.gather_packed(packed, layouts), items, layouts)]
        return hidden, preds

    def _from_zero(self, items: list[StepItem], key: tuple) -> tuple | None:
        """The key of a prefill over slots first.. laid into rows first.. of the warmed graph over slots 0.. (the
        rows below: padding over the running requests' slots); None when there is no such graph or its extra rows
        would add more than PAD_FLOPS of work."""
        wide = (bucket(items[0].slot + len(items), self.runner.pool.slots), *key[1:])
        extra = (wide[0] - key[0]) * key[1]  # padded queries past the step's own bucket
        if self.frozen and wide in self.statics and 2 * self.params * extra <= PAD_FLOPS:
            return wide
        return None

    def _run_at(self, items: list[StepItem], key: tuple) -> tuple[torch.Tensor, list[Predictions]]:
        """A prefill over slots [first, first + n) on the key's shapes, without a graph: the bucket's B rows over
        slots [start, start + B) (inside the pool), the prompts at rows first - start.., every other row padding
        (its queries write only its slot's trash position, so rows over running requests change nothing). When no
        prompt asks for a prediction the head is skipped (its logits would be [B, Qb, V])."""
        B, Qb, Lb, measures, suppress = key
        runner = self.runner
        first, n = items[0].slot, len(items)
        start = min(first, runner.pool.slots - B)
        row = first - start
        host = torch.empty(B, FIELDS * Qb + 3, dtype=torch.long)
        pack(items, host, runner.spec.mask_id, measures, suppress, row=row)
        inputs = host.to(runner.device, non_blocking=True)
        if not any(item.batch.logit_cols.numel() for item in items):  # plain prompts: no head over B x Qb queries
            hidden = runner.body(inputs, start, Lb, flex=self.attention == "flex")
            dtype = torch.promote_types(runner.dtype, torch.float32)
            none = [torch.empty(item.batch.tokens.shape[0], 0, dtype=dtype) for item in items]  # [K, 0]
            return hidden[row:row + n], [Predictions(e.long(), e, e) for e in none]
        hidden, packed = self._body(inputs, start, Lb, measures, suppress)
        preds = [Predictions(*p) for p in split(packed[row:row + n].cpu()[None], items)]  # one device-to-host copy
        return hidden[row:row + n], preds

    def _body(self, inputs: torch.Tensor, start: int, Lb: int, measures, suppress):
        """The static forward and batched predict of a packed step over slots [start, start + B)."""
        hidden = self.runner.body(inputs, start, Lb, flex=self.attention == "flex")  # [B, Qb, E]
        return hidden, self.runner.predict_packed(hidden, inputs, start, measures, suppress)

    def _capture(self, st: Static, measures, suppress) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body(st.inputs, 0, st.Lb, measures, suppress)  # warm-up: lazy kernel initialization stays out
        torch.cuda.current_stream().wait_stream(stream)
        st.graph = torch.cuda.CUDAGraph()
        with capturing(st.graph, self.pool):
            st.out = self._body(st.inputs, 0, st.Lb, measures, suppress)
        st.graph.replay()
        self.stats.captures += 1
