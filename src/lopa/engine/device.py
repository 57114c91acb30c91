"""The device path of a decode step: threshold / d2f / sdar / fast_dllm_v2 / lopa over any of them for every
running request at once, their state in device tensors (decoding/slots.py), the iteration batched
(decoding/batched.py, with the block-diffusion rules of decoding/batched_blocks.py), ONE small copy to the host.

    path.load(seqs)         # requests new to the path: host WindowState + pending batch -> their slot rows
    info = path.step(seqs)  # queries, ONE forward, accept, commit the winners, propose (one CUDA graph on a
                            # GPU); one read-back
    path.store(seqs)        # slot rows -> the requests' host states and pending batches (exact, lossless)

The engine takes this path for a decode step when every request of the step qualifies (``eligible``); when one
does not, the requests living here are stored back and the step runs the host strategies (and they come back
when all qualify again). Per step the host learns, from one [n, 7] copy: done, round cap, committed length,
next rows and width, the answer's settled length (streaming) and the winner.

Under Branch Parallel every rank holds the same slot rows and runs the same update; the group (runner/group.py)
says which rows of each slot this rank's forward computes and gathers every rank's predictions in global row
order, and the runner commits the winners (ModelRunner.commit_winners). Nothing here asks which rank it runs on.
"""

from __future__ import annotations

import functools
import math
import time
import types
import warnings

import torch

from ..config import CONFIDENCES, DecodeConfig, RunnerConfig
from ..decoding import batched
from ..decoding.base import PredictSpec
from ..decoding.block_diffusion import BlockDiffusionStrategy, FastDLLMv2Strategy, SDARStrategy
from ..decoding.slots import DEVICE_SCORES, Rows, Slots
from ..decoding.d2f import D2FStrategy
from ..decoding.threshold import ThresholdStrategy
from ..models.fused import COMPILE_LIMITS
from ..models.spec import ModelSpec
from ..runner.graphs import MAX_GRAPHS, capturing, round_up
from ..runner.model_runner import ModelRunner
from ..runner.step import pack_device
from .sequence import Sequence


def widths(Qb: int, lookaheads: int) -> tuple[int, int]:
    """(Wm, R) of a bucketed step whose forwards hold at most Qb queries (K*W <= Qb) over slots with ``lookaheads``
    lookaheads: Wm = Qb window columns (a request of one row may fill the bucket) and R branch rows, the largest K
    with K*(K - 1) <= Qb (a lookahead is a masked window position: K <= W + 1), at most lookaheads + 1. Derived
    from Qb alone, so the rows scored follow the step's size without a row bucket in the graph key: 23 at Qb =
    512, 32 at 1024, where the slots' capacity is 65."""
    return Qb, min(lookaheads + 1, (1 + math.isqrt(1 + 4 * Qb)) // 2)


# padded queries (B x Qb) from which a step may take the flat query axis (RunnerConfig.flat_queries): at Dream-7B
# shape on one H100 the flat forward was 1.41x faster from 3,072 padded queries up (8 requests at k = 3; the GEMMs
# run at their compute rate from a few hundred rows there); fewer are not measured
FLAT_MIN = 2048


def flat_counts(B: int, Qb: int, tile: int, least: int = FLAT_MIN) -> tuple[int, ...]:
    """The flat query counts T of a step keyed (B, Qb) (RunnerConfig.flat_queries): half and three quarters of its B x
    Qb padded queries, in multiples of ``tile``; none below ``least`` padded queries, where a forward is meant to
    cost about the same padded or not (the GPU not full). Two counts a key: the warm-up captures each."""
    full = B * Qb
    return () if full < least else tuple(sorted({round_up(full * f // 4, tile) for f in (2, 3)}))


PHASES = ("queries", "accept", "propose", "answer_ready")  # decoding/batched.py's update, in the order a step calls
# module floats as constants, and the warm-up's recompiles within limits (the names a torch version has)
_UPDATE_CONFIG = {name: value for name, value in {"specialize_float": True, **COMPILE_LIMITS}.items()
                  if hasattr(torch._dynamo.config, name)}


def _inductor_options() -> dict:
    """The update's Inductor options: no coalescing analysis for tilings, which asserted on the block-diffusion
    accept's score columns (a size of max(1, min(Wm, Qb // 2)); torch 2.11, an H100). The update's kernels are
    small, so its tiling heuristics go."""
    import torch._inductor.config as inductor
    return {"triton.coalesce_tiling_analysis": False} if hasattr(inductor.triton, "coalesce_tiling_analysis") else {}


@functools.cache  # one per process: every model's path shares its compiled graphs (a new torch.compile recompiles)
def compiled_update(backend: str = "inductor") -> types.SimpleNamespace:
    """decoding/batched.py's phases through torch.compile (the path's update where the runner fuses, RunnerConfig.fuse
    on a GPU, and RunnerConfig.compile_update), each one graph, dynamic in every size from the first call but the
    warmed slots' fixed widths (DevicePath.warmup), so the warm-up's keys share a few compiles (one request
    apart: size-oblivious tracing made Inductor fail). Eager, the update is a few hundred small kernels (an H100,
    32 lopa requests: 1.18 ms captured in a CUDA graph); compiled, 0.26-0.40 ms, the same results
    (benchmarks/device_update.py, update_compile.py), for 45-70 s of compiles on a machine's first start and about
    14-19 s on later ones (update_compile.py, H100). Module floats stay constants (specialize_float:
    dynamic=True would make them CPU tensors a CUDA kernel cannot read). A phase that does not compile
    (TorchDynamoException: raised while tracing, before any of its kernels ran) runs batched's own function, from
    then on every phase, one warning."""
    broken: list[str] = []
    options = _inductor_options() if backend == "inductor" else None

    def phase(name: str):
        fn = torch.compile(getattr(batched, name), dynamic=True, fullgraph=True, backend=backend, options=options)

        def call(*args):
            if not broken:
                try:
                    with torch._dynamo.config.patch(**_UPDATE_CONFIG):
                        return fn(*args)
                except torch._dynamo.exc.TorchDynamoException as err:
                    broken.append(name)
                    warnings.warn(f"the device path's update did not compile ({name}: {type(err).__name__}: {err}); "
                                  f"it runs unfused", RuntimeWarning, stacklevel=2)
            return getattr(batched, name)(*args)
        return call
    return types.SimpleNamespace(**{name: phase(name) for name in PHASES})


def mark_fixed_widths(slots: Slots, row_budget: torch.Tensor) -> None:
    """Tell torch.compile which sizes of the update's inputs no request or model changes (DevicePath.warmup): the
    slots' lookahead capacity and int and float field counts, and the row budget's one element."""
    for t in (slots.look, slots.ints, slots.floats):
        torch._dynamo.mark_static(t, 1)
    torch._dynamo.mark_static(row_budget)


class DevicePath:
    def __init__(self, runner: ModelRunner, spec: ModelSpec, max_lookahead: int = RunnerConfig.max_lookahead,
                 compiled: bool = False, flat_tile: int | None = None) -> None:
        self.runner, self.spec = runner, spec
        # the update's phases: ``compiled`` (RunnerConfig.compile_update where the runner fuses, a GPU) or eager; a
        # step run eagerly after the warm-up (a key it did not capture) calls batched's own, so that nothing
        # compiles while requests run
        self.update = compiled_update() if compiled else batched
        self.max_lookahead = max_lookahead  # the engine's admission ceiling on k: the warmed slots' lookaheads
        self.pdt = torch.promote_types(runner.dtype, torch.float32)
        self.eos = torch.tensor(spec.eos_ids, dtype=torch.int64, device=runner.device)
        self.slots: Slots | None = None
        self.host: list[list[int]] = []  # per slot, from the last read-back: [cached, rows, width]
        self.live = torch.zeros(runner.max_num_seqs, dtype=torch.bool, device=runner.device)  # slot < n
        self.row_budget = torch.full((1,), -1, dtype=torch.int64, device=runner.device)  # k_policy "load"; -1: None
        self._live_n = -1
        self.graphs: dict[tuple, tuple] = {}  # key -> (CUDA graph or None: seen once, its [B, 7] output)
        self._captured_for: tuple = ()
        self._luts: dict[tuple, torch.Tensor] = {}
        self._generation = 0  # bumped when the slots are reallocated (graphs read them in place)
        self.warm = False  # after warmup(): the slots never grow, nothing captures, an unwarmed key runs eagerly
        # RunnerConfig.flat_queries: the forward on the flat query axis (ModelRunner.forward_flat) for the steps that
        # have a flat count (flat_counts), each request's queries padded to a multiple of this many; None: the padded
        # rows always
        self.flat_tile = flat_tile
        self.flat_min = FLAT_MIN  # flat_counts' least (the tests lower it)
        self.flat = False  # the last step's forward took the flat query axis

    def eligible(self, seq: Sequence) -> bool:
        """Greedy threshold / d2f / sdar / fast_dllm_v2 / lopa over any of them with a device branch score, no
        trace. SDAR with fold_commit=False (its extra forward over each finished block) stays on the host."""
        strategy, cfg = seq.strategy, seq.config
        fits = not self.warm or (len(seq.state.canvas) <= self.slots.width
                                 and strategy.lookahead <= self.slots.look.shape[1])  # warmed slots never grow
        kinds = (ThresholdStrategy, D2FStrategy, FastDLLMv2Strategy) + ((SDARStrategy,) if cfg.fold_commit else ())
        return (type(strategy) in kinds and not cfg.trace
                and cfg.branch_confidence in DEVICE_SCORES and seq.state.prompt_len > 0
                and seq.pspec == PredictSpec(0.0, 1.0, cfg.confidence, (self.spec.mask_id,)) and fits)

    # -- slots -----------------------------------------------------------------------------------------
    def _reserve(self, slots: int, positions: int, lookahead: int) -> None:
        kc, Tc = max(1, lookahead), max(positions, lookahead, 1)
        if self.slots is None:
            self.slots = Slots.empty(slots, Tc, kc, self.runner.device, self.pdt)
        elif slots > self.slots.slots or Tc > self.slots.width or kc > self.slots.look.shape[1]:
            if self.warm:  # eligible() keeps such requests on the host path
                raise RuntimeError(f"the device path's slots were sized at start-up ({self.slots.slots} slots, "
                                   f"{self.slots.width} positions, {self.slots.look.shape[1]} lookaheads)")
            self.slots = self.slots.grown(slots, Tc, kc)
            self._generation += 1
        self.host += [[0, 0, 0] for _ in range(self.slots.slots - len(self.host))]

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Plan.moves (compaction, the step budget's rotation): slot rows follow their requests, all at once."""
        if self.slots is None or not moves:
            return
        src, dst = [s for s, _ in moves], [d for _, d in moves]
        self.slots.move(src, dst)  # index lists: every row is read before any is written
        rows = [list(self.host[s]) for s in src]
        for d, row in zip(dst, rows):
            self.host[d] = row

    def load(self, seqs: list[Sequence]) -> None:
        """Requests new to the path into their slot rows, all in one write a field (Slots.load_many)."""
        if not seqs:
            return
        self._reserve(max(max(s.slot for s in seqs) + 1, self.runner.max_num_seqs),
                      max(len(s.state.canvas) for s in seqs), max(s.strategy.lookahead for s in seqs))
        self.slots.load_many([s.slot for s in seqs], [(s.strategy, s.state, s.batch,
                                                       DEVICE_SCORES.index(s.config.branch_confidence)) for s in seqs])
        for seq in seqs:
            self.host[seq.slot] = [seq.batch.start, *seq.batch.tokens.shape]
            seq.on_device = True

    def store(self, seqs: list[Sequence]) -> None:
        """Slot rows back into the requests' host states and pending batches, one read a field (Slots.store_many)."""
        if not seqs:
            return
        batches = self.slots.store_many([s.slot for s in seqs], [s.strategy for s in seqs], [s.state for s in seqs])
        for seq, batch in zip(seqs, batches):
            seq.batch = batch
            seq.on_device = False

    def finish(self, seqs: list[Sequence]) -> None:
        """Requests the step finished: their final canvases (and counts) to their host states, in one read
        (Slots.store_done); no batch left."""
        if not seqs:
            return
        self.slots.store_done([s.slot for s in seqs], [s.strategy for s in seqs], [s.state for s in seqs])
        for seq in seqs:
            seq.batch = None
            seq.on_device = False

    def refresh(self, seq: Sequence) -> None:
        """Copy the request's canvas into its host state (progress callbacks read it; the rest stays stale)."""
        seq.state.canvas = self.slots.canvas_of(seq.slot, len(seq.state.canvas), self.spec)

    def shape(self, seq: Sequence) -> tuple[int, int]:
        """(rows K, width W) of the request's pending forward."""
        _, K, W = self.host[seq.slot]
        return K, W

    def answer(self, seq: Sequence, lo: int, hi: int) -> list[int]:
        """Generated ids [lo, hi) of the request's answer (settled: the caller read ``ready``)."""
        P = seq.state.prompt_len
        return self.slots.canvas[seq.slot, P + lo:P + hi].tolist()

    # -- one step --------------------------------------------------------------------------------------------
    def step(self, seqs: list[Sequence], row_budget: int | None = None) -> list[list[int]]:
        """The decode step of seqs (slots 0..n-1, all on the device): per request [done, capped, cached, rows,
        width, ready, winner] after it. ``row_budget``: what the next proposals read (Engine.row_budget)."""
        n = len(seqs)
        self.row_budget.fill_(-1 if row_budget is None else row_budget)
        measures = tuple(sorted({s.config.confidence for s in seqs}))
        scores = tuple(sorted({s.config.branch_confidence for s in seqs}))
        if n != self._live_n:
            self.live.copy_(torch.arange(self.live.shape[0], device=self.live.device) < n)
            self._live_n = n
        self._lut(measures)
        out = self._run(self.host[:n], measures, scores, self._span(seqs))
        rows = out[:n].tolist()  # the one copy to the host
        for b, row in enumerate(rows):
            self.host[b] = row[2:5]
        self.runner.set_lengths([row[2] for row in rows])
        if self.runner.group.check:  # RunnerConfig.bp_check: every rank's lengths, K/V and canvases agree
            canvas = self.slots.canvas[:n].cpu()
            self.runner.verify(list(range(n)), [canvas[b, :len(s.state.canvas)] for b, s in enumerate(seqs)])
        return rows

    def _span(self, seqs: list[Sequence]) -> int:
        """J of the block-diffusion rules (decoding/batched_blocks.py): the largest W + 2 * block_size over the
        step's block-diffusion requests, 0 without one."""
        return max((self.host[s.slot][2] + 2 * s.config.block_size for s in seqs
                    if isinstance(s.strategy, BlockDiffusionStrategy)), default=0)

    def _keyed_span(self, Wm: int, J: int) -> int:
        """The span of a bucketed step (a key of the static path): for a block-diffusion model Wm + 2 * its block
        size whatever the step holds (W <= Wm; a block-diffusion strategy runs with the model's block size), so
        the span follows from Qb and the warm-up captures it; for another model _span's J rounded up to a power
        of two (0 without a block-diffusion request)."""
        if self.spec.block_size:
            return Wm + 2 * self.spec.block_size
        return 1 << (J - 1).bit_length() if J else 0

    def _lut(self, measures: tuple[str, ...]) -> torch.Tensor:
        """A request's measure (CONFIDENCES index) -> its index in the step's list ``measures``, made once per list
        (graphs read it in place)."""
        if measures not in self._luts:
            index = [measures.index(m) if m in measures else 0 for m in CONFIDENCES]
            self._luts[measures] = torch.tensor(index, device=self.live.device)
        return self._luts[measures]

    def _shape(self, host: list[list[int]], eager: bool = False) -> tuple[int, int, int | None, int, int]:
        """(B, Qb, Lb, Wm, R) of the update over the requests whose [cached, rows, width] are ``host``. (B, Qb, Lb):
        the runner's buckets (runner.packed_shape; Lb None under "flex") for the largest share of a request's rows
        a rank computes (runner.rank_queries: the same on every rank; one process: K*W); (Wm, R) from the bucket of
        the requests' whole K*W (``widths``): a key set fixed by the buckets and the slots' lookahead capacity.
        Without a static path: the step's exact shapes."""
        runner = self.runner
        local = [runner.rank_queries(K, W) for _, K, W in host]
        B, Qb, Lb = runner.packed_shape(len(host), max(local), max(P + q for (P, _, _), q in zip(host, local)), eager)
        if runner.graphs is None:
            return B, Qb, Lb, max(W for _, _, W in host), max(K for _, K, _ in host)
        return B, Qb, Lb, *self._widths(runner.graphs.bucket_queries(max(K * W for _, K, W in host)))

    def _widths(self, Qb: int) -> tuple[int, int]:
        return widths(Qb, self.slots.look.shape[1])

    def _run(self, host: list[list[int]], measures: tuple[str, ...], scores: tuple[str, ...],
             span: int) -> torch.Tensor:
        """The update of the step's key, replayed (or captured lazily before any warm-up; Branch Parallel never
        captures: Engine). After the warm-up a key it did not capture runs eagerly (counted with the static path's
        eager steps): SDPA over the span, nothing captured or compiled for a new FlexAttention shape. ``span``:
        _span's J."""
        shape = self._shape(host)
        if self.runner.graphs is not None:
            span = self._keyed_span(shape[3], span)
        T = self._flat_queries(host, *shape[:2])
        key = (*shape, measures, scores, span) + ((T,) if T else ())
        if self.warm and key not in self.graphs:  # on the padded rows, SDPA over the span
            self.flat = False
            self.runner.graphs.stats.eager_steps += 1
            eager = self._shape(host, eager=True)
            return self._update(*eager, measures, scores, self._keyed_span(eager[3], span), batched)
        self.flat = T is not None
        return self._replay(key, lambda: self._update(*shape, measures, scores, span, T=T))

    def _flat_queries(self, host: list[list[int]], B: int, Qb: int) -> int | None:
        """T of the step's forward on the flat query axis: the smallest of the (B, Qb) key's flat counts that holds
        the requests' K*W queries, each padded to a multiple of ``flat_tile``; None (the padded rows) without
        flat_tile, under Branch Parallel, or where none holds them."""
        if self.flat_tile is None or self.runner.group.distributed:
            return None
        total = sum(round_up(K * W, self.flat_tile) for _, K, W in host)
        return next((T for T in flat_counts(B, Qb, self.flat_tile, self.flat_min) if T >= total), None)

    def _update(self, B: int, Qb: int, Lb: int | None, Wm: int, R: int, measures: tuple[str, ...],
                scores: tuple[str, ...], span: int, update=None, T: int | None = None) -> torch.Tensor:
        """Queries, forward, accept, commit, propose over slots 0..B-1; rows past the step's requests (free slots)
        are zeroed first: no rows, no generated region, every index in range. The forward computes this rank's rows
        of each slot (group.local_rows; one process: all of them), the group gathers every rank's predictions in
        global row order (one process: they are), every rank runs the same update, and the runner commits the
        winners (under Branch Parallel from this rank's rows or the owner's broadcast, after reading them back).
        In one process device work only: graph-capturable. ``update``: the phases' functions (default: the path's).
        ``T``: the forward on the flat query axis of T queries (ModelRunner.forward_flat). -> [B, 7]."""
        ops = update or self.update
        t0 = time.perf_counter()
        st, mask, runner, group = self.slots, self.spec.mask_id, self.runner, self.runner.group
        v = Rows(st, B)
        live = self.live[:B]
        st.ints[:B] = torch.where(live[:, None], st.ints[:B], 0)  # free slots: no rows, no blocks, in range
        lo, K = v.cached.clone(), v.rows  # K [B]: a view of the slots, used only before propose rewrites it
        fields = ops.queries(st, B, Qb, mask, group.local_rows(K))
        inputs = pack_device(fields, torch.where(live, lo, 0), self._luts[measures][v.measure], live.long(), B, mask)
        t1 = time.perf_counter()
        if T:  # ONE forward: [B, Qb, 3]
            packed = runner.forward_flat(inputs, T, self.flat_tile, measures, (mask,))
        else:
            packed = runner.forward_packed(inputs, Lb, measures, (mask,))
        t2 = time.perf_counter()
        W, commit = v.width.clone(), v.commit.clone()
        preds = group.gather_rows(packed, K, W)  # [B, >= K*W, 3]
        t3 = time.perf_counter()
        winner = ops.accept(st, B, preds, Wm, R, scores, mask, self.eos, span)
        c = group.counters  # Branch Parallel's phases (a captured update counts its capture once)
        c.prepare_s += t1 - t0
        c.forward_s += t2 - t1
        c.select_s += time.perf_counter() - t3
        # a lookahead row wins only in a slot of K >= 2 rows, whose K*W <= Qb queries leave it W <= Qb / 2 columns
        runner.commit_winners(lo, winner, K, W, commit, min(Wm, max(1, Qb // 2)))
        ops.propose(st, B, mask, self.row_budget, Wm, span)
        ready = ops.answer_ready(st, B, mask, Wm, span)
        return torch.stack([v.done, v.capped, v.cached, v.rows, v.width, ready, winner], 1)

    def _replay(self, key: tuple, update) -> torch.Tensor:
        """On a GPU with CUDA graphs: replay the key's graph. Before any warm-up (lazily) the first step of a key
        runs eagerly (it warms the kernels up and compiles), the second captures the step into a graph (capture
        runs nothing) and replays it, later ones replay. The graphs read the slots, the KV pool and the live mask
        in place: a new pool or new slots drop them (never after the warm-up: both are final then)."""
        graphs = self.runner.graphs
        if graphs is None or not graphs.capture:
            return update()
        if not self.warm:
            if self._captured_for != (self._generation, graphs.pool):  # graphs.pool is new whenever the KV pool is
                self.graphs.clear()
                self._captured_for = (self._generation, graphs.pool)
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= MAX_GRAPHS:
                    self.graphs.clear()
                self.graphs[key] = (None, None)
                return update()
            if entry[0] is None:
                self.graphs[key] = self._capture(update)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, update) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, self.runner.graphs.pool):
            out = update()
        self.runner.graphs.stats.captures += 1
        return graph, out

    # -- start-up ----------------------------------------------------------------------------------------------
    def warmup(self, shapes: list[tuple[int, int]], on_graph=None) -> int:
        """After the static path's warm-up (ModelRunner.warmup, "flex", a fixed pool): size the slots for good (every
        pool slot, the longest canvas a slot and the context allow, the engine's largest k) and capture the
        update of every (B bucket, query bucket) in ``shapes`` for the default measure and branch score (with
        ``flat_tile``, at each of its flat counts too: flat_counts), reusing the static path's compiled kernels (the
        forward is the same); on a CPU run each once. Counted in the
        static path's GraphStats, whose start-up then ends again (GraphExecutor.started). A compiled update sees the
        slots' widths that no request or model changes (the lookahead capacity, the field counts) as constants
        (torch._dynamo.mark_static; benchmarks/update_compile.py: 13% less compiling on a CPU, no gain measured on
        an H100); the slot count and width and the step's sizes stay dynamic, so models of other pool sizes share
        its graphs. ``on_graph(done, total)`` after each key. Returns the number of keys (graphs)."""
        runner = self.runner
        tile = self.flat_tile
        keys = [(B, Qb, T) for B, Qb in shapes
                for T in (None, *(flat_counts(B, Qb, tile, self.flat_min) if tile is not None else ()))]
        with runner.graphs.measured(len(keys)):
            # a canvas (prompt + gen_length) fits the context (decoding/base.py) and its KV slot; allocated outside
            # inference mode, as lazily grown slots are: load() may write them from either mode
            self._reserve(runner.pool.slots, min(runner.pool.capacity, self.spec.max_length), self.max_lookahead)
            if self.update is not batched:  # compiled: sizes no request changes become constants of its graphs
                mark_fixed_widths(self.slots, self.row_budget)
            self.live.zero_()  # every row a free slot: the updates below change no request
            self._live_n = 0
            self._capture_all(keys, on_graph)
        runner.graphs.started()
        self.warm = True
        return len(keys)

    @torch.inference_mode()  # the mode every step runs in (compiled guards match later steps)
    def _capture_all(self, keys: list[tuple[int, int, int | None]], on_graph) -> None:
        graphs = self.runner.graphs
        measures, scores = (DecodeConfig.confidence,), (DecodeConfig.branch_confidence,)
        self._lut(measures)
        self._captured_for = (self._generation, graphs.pool)
        for done, (B, Qb, T) in enumerate(keys, 1):
            Wm, R = self._widths(Qb)
            span = self._keyed_span(Wm, 0)
            key = (B, Qb, None, Wm, R, measures, scores, span) + ((T,) if T else ())  # as _run forms it ("flex")
            update = functools.partial(self._update, B, Qb, None, Wm, R, measures, scores, span, T=T)
            with graphs.timed_key(f"update B={B} Qb={Qb}" + (f" T={T}" if T else "")):
                update()  # eagerly first (a compiled update compiles here): lazy initialization stays out of graphs
                self.graphs[key] = entry = self._capture(update) if graphs.capture else (None, None)
                if entry[0] is not None:  # launched once here: a graph's first launch uploads it to the device,
                    entry[0].replay()  # which the first request of this shape would pay (as the static path's do)
            if on_graph is not None:
                on_graph(done, len(keys))
