"""The engine: many requests, ONE forward per step, requests joining and leaving between steps.

    seq = engine.prepare(prompt_ids, config)   # host only, any thread: strategy, state, KV need; typed errors
    engine.add(seq)                            # queued FIFO (the engine's thread)
    outs = engine.step()                       # schedule -> one forward -> accept -> commit -> propose
    results = engine.generate(seqs)            # the loop generate / generate_many use

Each request keeps its own strategy and state (decoding/base.py: the contract is unchanged); the engine
guarantees each strategy that ``propose`` is called exactly once per forward it takes part in, that
``accept`` gets exactly that forward's predictions, and that its window starts at its committed KV length.

A decode step whose requests are all greedy threshold / d2f / sdar / fast_dllm_v2 / lopa (no trace) runs on the
device path instead (engine/device.py: their states in device rows, the iteration batched, one small copy back); the
strategies' contract above is its specification, and requests move between the paths losslessly.

Under Branch Parallel the engine is replicated: every rank runs the same Engine over the same requests and
takes the same decisions (the strategies are deterministic and see the same gathered predictions). The engine
hands the group (runner/group.py) every join, abort and fail_all (``group.record``) and runs each step through it
(``group.step``), which ships rank 0's events first, so they take effect at the same point on every rank; the
workers run ``serve_worker`` (``group.follow``) until rank 0 stops. The engine never asks which rank it is.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import DecodeConfig, RunnerConfig
from ..decoding import make_strategy
from ..decoding.base import counted_tokens
from ..models.spec import ModelSpec
from ..errors import ConfigError, OutOfMemoryError, PromptTooLongError
from ..runner.model_runner import ModelRunner
from ..runner.group import Event
from ..runner.step import Commit, StepItem
from .device import DevicePath
from .scheduler import Scheduler
from .sequence import RequestOutput, RunOutput, Sequence, Status

log = logging.getLogger("lopa.engine")


@dataclass
class StepInfo:
    kind: str  # prefill | decode
    requests: int
    rows: int  # branch rows computed (sum of K over the step's requests)
    seconds: float  # wall time of the whole step: scheduling, slot moves, forward, update, outputs (Engine._run)
    positions: int  # query positions computed (sum of K*W; a prefill's prompt positions)
    request_ids: tuple[str, ...]  # the requests the step computed, in the step's order
    queries: int = 0  # the most query positions (K*W) of one request of the step (its query bucket's size)


@dataclass
class EngineCounters:
    """Engine-wide, cumulative; per-request counts live in each request's Stats."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    rows: int = 0  # decode steps' branch rows
    requests: int = 0  # decode steps' requests (requests per step = requests / decode_steps)
    prefill_s: float = 0.0  # wall seconds of prefill steps
    decode_s: float = 0.0  # wall seconds of decode steps (throughput = generated tokens / decode_s)
    # the static path (runner/graphs.py: GraphStats), after start-up: each should stay 0 on a warmed-up GPU
    captures_after_start: int = 0  # CUDA graphs captured while requests ran
    recompiles_after_start: int = 0  # torch.compile graphs compiled since start-up (process-wide)
    eager_decode_steps: int = 0  # greedy decode steps that ran eagerly: their shape was not captured
    eager_prefill_steps: int = 0  # prefill steps that ran eagerly with exact shapes after the warm-up (no warmed key)
    device_steps: int = 0  # decode steps that ran on the device path (engine/device.py)
    flat_steps: int = 0  # of those, the steps whose forward took the flat query axis (RunnerConfig.flat_queries)
    # the step budget (engine/scheduler.py): decode steps that ran only the first of the running requests, because
    # all of them together had no warmed shape, and the requests those steps left waiting (summed over the steps)
    partial_steps: int = 0
    deferred_requests: int = 0

    @property
    def rows_per_step(self) -> float:
        return self.rows / self.decode_steps if self.decode_steps else 0.0

    @property
    def requests_per_step(self) -> float:
        return self.requests / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict:
        keys = ("steps", "prefill_steps", "decode_steps", "device_steps", "flat_steps", "rows", "requests", "prefill_s",
                "decode_s", "rows_per_step", "requests_per_step", "captures_after_start", "recompiles_after_start",
                "eager_decode_steps", "eager_prefill_steps", "partial_steps", "deferred_requests")
        return {k: getattr(self, k) for k in keys}


def kv_need(strategy, prompt_len: int, gen_length: int) -> int:
    """The most KV positions any forward of the request writes, plus the trash slot: a forward writes
    K*W positions after its committed prefix, with W <= T - cached, largest right after the prompt.
    A strategy whose windows are laid out otherwise (block diffusion) says so itself."""
    if hasattr(strategy, "kv_need"):
        return strategy.kv_need(prompt_len, gen_length)
    return prompt_len + (getattr(strategy, "lookahead", 0) + 1) * gen_length + 1


class Engine:
    def __init__(self, runner: ModelRunner, spec: ModelSpec, max_num_seqs: int = 1, step_rows: int | None = None,
                 max_lookahead: int = RunnerConfig.max_lookahead,
                 max_num_batched_tokens: int = RunnerConfig.max_num_batched_tokens, device_step: bool = False,
                 device_step_min: int = 1, compile_update: bool = True, flat_queries: bool = False) -> None:
        self.runner, self.spec = runner, spec
        # RunnerConfig.device_step: decode steps whose requests all qualify run on the device path; Branch Parallel
        # with CUDA graphs keeps the host path, whose static path captures the forward with its gather
        captured_bp = runner.group.distributed and runner.graphs is not None and runner.graphs.capture
        self.device = (DevicePath(runner, spec, max_lookahead, compile_update and runner.fuse,
                                  flat_tile=1 if flat_queries else None)
                       if device_step and not captured_bp else None)
        self.device_min = device_step_min  # config.device_step_min_of: fewer running requests take the host path
        self.step_rows = step_rows  # RunnerConfig.step_rows: the rows a decode step aims at (row_budget)
        self.max_lookahead, self.max_num_batched_tokens = max_lookahead, max_num_batched_tokens  # admission bounds
        self.scheduler = Scheduler(max_num_seqs, fits=runner.fits, take=self._decode_take)
        self.counters = EngineCounters()
        self.last_step: StepInfo | None = None
        self.step_log: list[StepInfo] | None = None  # set to a list to keep every step's StepInfo (benchmarks)
        self.winner_log: dict[str, list[int]] | None = None  # set to a dict: each request's winning row per decode step
        self._ids = itertools.count()
        self._done: list[Sequence] = []  # finished or aborted outside a step: reported by the next step()
        self.group = runner.group
        self.bp = runner.group.counters  # Branch Parallel's phase timers and bytes (runner/group.py)

    # -- requests ------------------------------------------------------------------------------------------
    def prepare(self, prompt: list[int], config: DecodeConfig, request_id: str | None = None,
                stream: bool = False) -> Sequence:
        """A request ready to queue. Host only and touches no engine state (safe from any thread); raises
        ConfigError / PromptTooLongError when it cannot fit the context, the engine's bounds or a KV slot."""
        strategy = make_strategy(config, self.spec)
        need = kv_need(strategy, len(prompt), config.gen_length)
        self._check_bounds(strategy, len(prompt), need)
        state = strategy.start(prompt)
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt), config, strategy, state,
                       strategy.predict_spec, need, stream=stream)
        seq.batch = strategy.propose(state)
        seq.device_ok = self.device is not None and self.device.eligible(seq)
        if seq.pspec.temperature > 0:
            seq.generator = self.runner.new_generator(config.seed)
        return seq

    def _check_bounds(self, strategy, prompt_len: int, need: int) -> None:
        """Admission: what one request may ask of this engine (RunnerConfig's bounds), before it allocates anything.
        Named after the request field that sets it: k where lookaheads do, else the lengths."""
        k, T = getattr(strategy, "lookahead", 0), strategy.cfg.gen_length
        if k > self.max_lookahead:
            raise ConfigError(f"k: {k} lookaheads exceed this engine's ceiling of {self.max_lookahead} "
                              "(RunnerConfig.max_lookahead)")
        error, what = (ConfigError, f"k: with k = {k} and gen_length {T}") if k else \
            (PromptTooLongError, f"gen_length: prompt ({prompt_len} tokens) with gen_length {T}")
        peak = strategy.largest_forward(prompt_len)
        if peak > self.max_num_batched_tokens:
            raise error(f"{what} one forward can hold {peak} query positions (K*W); this engine runs at most "
                        f"{self.max_num_batched_tokens} per step (RunnerConfig.max_num_batched_tokens)")
        cap = self.runner.slot_capacity()
        if cap is not None and need > cap:
            raise PromptTooLongError(f"prompt ({prompt_len} tokens) with gen_length {T} and {need - prompt_len - 1} "
                                     f"window positions needs {need} KV positions; a slot holds {cap} "
                                     "(RunnerConfig.max_positions)")
        if not self.runner.fits(1, need):
            mib = self.runner.slot_bytes(cap or need) / 2**20
            raise error(f"{what} needs {need} KV positions ({mib:.0f} MiB); the KV pool may take "
                        f"{self.runner.kv_budget / 2**20:.0f} MiB (RunnerConfig.kv_cache_bytes)")

    def add(self, seq: Sequence) -> None:
        self.group.record(("add", seq.id, seq.prompt, seq.config, seq.stream))
        if seq.batch is None:  # nothing to run (a strategy that is done at once): finishes at the next step
            self._done.append(seq)
            return
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request between steps; the next step() reports it (finish_reason "abort") and frees its slot."""
        self.group.record(("abort", request_id))
        for seq in list(self.scheduler.waiting):
            if seq.id == request_id:
                self.scheduler.remove_waiting(seq)
                seq.finish_reason = "abort"
                self._done.append(seq)
        for seq in self.scheduler.running:
            if seq.id == request_id and seq.status is Status.RUNNING:
                self._release(seq)
                seq.finish_reason = "abort"
                self._done.append(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._done)

    def _decode_take(self, seqs: list[Sequence]) -> int:
        """The scheduler's step budget: how many of the first of ``seqs`` (the running requests, slot order) the
        next decode step runs (ModelRunner.decode_take: a shape the warm-up captured). A step holding a request
        of a kind the warm-up captured no graph for runs eagerly whatever its size, so it takes every request:
        splitting it would only add steps."""
        device = self._on_device(seqs, len(seqs))  # the path the whole step would take
        if not all(self._warmed_kind(s, device) for s in seqs):
            return len(seqs)
        shapes = [s.device_shape if s.on_device else tuple(s.batch.tokens.shape) for s in seqs]
        return self.runner.decode_take(shapes)

    def _on_device(self, seqs: list[Sequence], running: int) -> bool:
        """Whether a decode step of ``seqs`` takes the device path: it is on, every request of the step qualifies
        and at least RunnerConfig.device_step_min requests are running (the running count, not the step's: a step
        the budget splits takes the path of its whole batch)."""
        return self.device is not None and running >= self.device_min and all(s.device_ok for s in seqs)

    def _warmed_kind(self, seq: Sequence, device: bool) -> bool:
        """Whether the warm-up's graphs serve this request: a greedy predict with the default measure and suppressed
        ids (runner/graphs.py: warmup_keys) and, on the device path, the default branch score (engine/device.py)."""
        p = seq.pspec
        kind = p.greedy and p.measure == DecodeConfig.confidence and p.suppress_ids in ((), (self.spec.mask_id,))
        return kind and (not device or seq.config.branch_confidence == DecodeConfig.branch_confidence)

    @property
    def num_running(self) -> int:
        return sum(s.status is Status.RUNNING for s in self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()  # a step never needs autograd, whoever calls it (the front ends already run in this mode)
    def step(self) -> list[RequestOutput]:
        return self.group.step(self._step)  # Branch Parallel: rank 0's events reach the workers first

    def serve_worker(self) -> None:
        """A Branch Parallel worker (rank > 0): apply rank 0's joins/aborts and take the same steps, until rank 0
        stops the group."""
        self.group.follow(self._apply, self._step)

    def _apply(self, event: Event) -> None:
        """One of rank 0's events (runner/group.py: Event), replayed on a worker."""
        if event[0] == "add":
            _, rid, prompt, config, stream = event
            self.add(self.prepare(prompt, config, rid, stream))
        elif event[0] == "abort":
            self.abort(event[1])
        else:  # "fail_all": rank 0's step failed and it emptied its engine
            self.fail_all(RuntimeError(f"rank 0 failed the step: {event[1]}"))

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()  # a step's seconds include its scheduling (_run)
        outputs = [self._finish(seq) for seq in self._done]
        self._done = []
        plan = self.scheduler.schedule()
        if plan.deferred:
            self.counters.partial_steps += 1
            self.counters.deferred_requests += plan.deferred
        if plan.seqs:
            try:
                outputs += self._run(plan, t0)
            except Exception as err:  # noqa: BLE001 - only an out-of-memory in one process is survivable
                if not self.group.survives(err):
                    raise
                outputs += self._out_of_memory(plan, err)
        if not self.scheduler.has_work():  # idle: the pool goes back to nothing (the next step allocates)
            self.runner.shrink()
        return outputs

    def _run(self, plan, t0: float) -> list[RequestOutput]:
        """One scheduled step: ONE forward for every request of the plan, accept, commit, propose. Its seconds
        (StepInfo.seconds, the counters' prefill_s / decode_s) run from ``t0``, the step's start (before its
        scheduling and slot moves), to its last output: the whole step's wall time, host work included."""
        outputs = []
        running = self.scheduler.running
        try:  # first: the live slots are then 0..n-1, and the pool may be resized
            self.runner.move(plan.moves)
            if self.device is not None:  # with the KV: an out-of-memory in reserve must not part them
                self.device.move(plan.moves)
        except Exception as err:  # the scheduler renumbered the slots already: no running request may go on
            if not self.group.survives(err):
                raise
            return self.fail_all(OutOfMemoryError(
                f"the engine ran out of memory moving the running requests' slots ({type(err).__name__}), so every "
                "request in it failed; lower RunnerConfig.max_num_seqs or kv_cache_bytes"))
        self.runner.reserve(len(running), max(s.need for s in running))
        seqs = plan.seqs
        if self.device is not None:
            if not plan.prefill and self._on_device(seqs, len(running)):
                return outputs + self._device_step(seqs, t0)
            # a host step: requests living on the device come back to their host states
            self.device.store([s for s in seqs if s.on_device])
        preds = self.runner.execute([StepItem(s.slot, s.batch, s.pspec, s.generator) for s in seqs])  # ONE forward
        batches = [s.batch for s in seqs]
        t1 = time.perf_counter()
        commits = []
        for i, (s, p) in enumerate(zip(seqs, preds)):
            row = self._guard(s, s.strategy.accept, s.state, s.batch, p)
            commits.append(Commit(s.slot, i, row or 0, s.batch.commit if s.error is None else 0))
        self._log_winners(seqs, [c.row for c in commits], plan.prefill)
        self.bp.select_s += time.perf_counter() - t1
        self.runner.commit(commits)
        self.runner.verify([s.slot for s in seqs], [s.state.canvas for s in seqs])
        budget = self.row_budget()
        for s in seqs:  # the next forward is decided now; None = finished
            s.state.row_budget = budget  # read by k_policy "load" (decoding/budget.py); a plain int, no device state
            s.batch = None if s.error is not None else self._guard(s, s.strategy.propose, s.state)
        dt = time.perf_counter() - t0  # each request's share: the step up to its outputs
        for s, batch in zip(seqs, batches):
            s.stats.add_forward(batch, dt)
            if s.error is not None or s.batch is None:
                self._release(s)
                outputs.append(self._finish(s))
            elif s.stream:
                out = self._stream(s)
                if out is not None:
                    outputs.append(out)
        self._count(plan.prefill, sum(b.tokens.shape[0] for b in batches), sum(b.tokens.numel() for b in batches),
                    time.perf_counter() - t0, [s.id for s in seqs], max(b.tokens.numel() for b in batches))
        return outputs

    def _device_step(self, seqs: list[Sequence], t0: float) -> list[RequestOutput]:
        """A decode step on the device path (engine/device.py): the same counting and outputs as the host's (``t0``:
        the step's start, _run's)."""
        self.device.load([s for s in seqs if not s.on_device])
        shapes = [self.device.shape(s) for s in seqs]  # (K, W) of each request's forward in this step
        info = self.device.step(seqs, self.row_budget())  # ONE forward
        self.counters.device_steps += 1
        self.counters.flat_steps += self.device.flat
        self._log_winners(seqs, [row[6] for row in info], False)
        outputs = []
        self.device.finish([s for s, row in zip(seqs, info) if row[0]])  # final canvases to the host states
        dt = time.perf_counter() - t0  # each request's share: the step up to its outputs
        for s, (K, _), (done, _, _, rows, width, ready, _) in zip(seqs, shapes, info):
            s.stats.add_decode(K, dt)
            s.device_shape = (rows, width)  # its slot may move before the next step (scheduler: take, moves)
            if done:
                self._release(s)
                outputs.append(self._finish(s))
            elif s.stream:
                out = self._stream(s, ready)
                if out is not None:
                    outputs.append(out)
        self._count(False, sum(K for K, _ in shapes), sum(K * W for K, W in shapes), time.perf_counter() - t0,
                    [s.id for s in seqs], max(K * W for K, W in shapes))
        return outputs

    def _log_winners(self, seqs: list[Sequence], rows: list[int], prefill: bool) -> None:
        if self.winner_log is not None and not prefill:
            for s, row in zip(seqs, rows):
                self.winner_log.setdefault(s.id, []).append(row)

    @staticmethod
    def _guard(seq: Sequence, fn, *args):
        """A strategy that fails ends its own request (finish_reason "error"), never the others in the step."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the error is reported on the request's output
            seq.error = err
            return None

    def _out_of_memory(self, plan, err: BaseException) -> list[RequestOutput]:
        """A step ran out of memory (one process): its requests fail with OutOfMemoryError and leave their slots;
        requests outside the step keep their KV and go on. What the step allocated was freed with its frames."""
        kind = "prefill" if plan.prefill else "decode"
        error = OutOfMemoryError(f"the engine ran out of memory in a {kind} step of {len(plan.seqs)} request(s) "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); lower k, gen_length "
                                 "or RunnerConfig.max_num_seqs / max_num_batched_tokens / kv_cache_bytes")
        log.warning("%s", error)
        for seq in plan.seqs:
            if seq.status is Status.RUNNING:
                self._release(seq)
            seq.error = error
        return [self._finish(seq) for seq in plan.seqs]

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """The step itself failed (the device, a collective): every queued and running request ends with this
        error and the engine is empty again. Returns their outputs. Under Branch Parallel the workers do the
        same before their next step."""
        self.group.record(("fail_all", f"{type(error).__name__}: {error}"))
        seqs = list(self.scheduler.waiting) + [s for s in self.scheduler.running if s.status is Status.RUNNING]
        seqs += self._done
        self._done = []
        for seq in seqs:
            if seq.status is Status.RUNNING:
                self._release(seq)
            seq.error = seq.error or error
        self.scheduler.waiting.clear()
        self.runner.shrink()
        return [self._finish(seq) for seq in seqs]

    def row_budget(self) -> int | None:
        """Each request's share of step_rows in the next step: the rows split evenly among the requests that
        will run it (those running now, the ones finishing this step included, plus the waiting that fit)."""
        if self.step_rows is None:
            return None
        n = min(self.scheduler.max_num_seqs, self.num_running + self.num_waiting)
        return self.step_rows // max(1, n)

    def _release(self, seq: Sequence) -> None:
        """The request leaves: its slot is empty from now on and is reused after the next compaction."""
        self.runner.release(seq.slot)
        self.scheduler.finish(seq)

    def _count(self, prefill: bool, rows: int, positions: int, seconds: float, ids: list[str], queries: int) -> None:
        c = self.counters
        c.steps += 1
        if prefill:
            c.prefill_steps += 1
            c.prefill_s += seconds
        else:
            c.decode_steps += 1
            c.decode_s += seconds
            c.rows += rows
            c.requests += len(ids)
        if self.runner.graphs is not None:
            g = self.runner.graphs.refresh_stats()
            c.captures_after_start, c.recompiles_after_start = g.captures_after_start, g.recompiles_after_start
            c.eager_decode_steps, c.eager_prefill_steps = g.eager_steps, g.eager_prefills
        self.last_step = StepInfo("prefill" if prefill else "decode", len(ids), rows, seconds, positions, tuple(ids),
                                  queries)
        if self.step_log is not None:
            self.step_log.append(self.last_step)

    def _stream(self, seq: Sequence, ready: int | None = None) -> RequestOutput | None:
        """Whole settled blocks since the last output: filled positions never change, so a prefix of the
        strategy's output without holes is final. ``ready``: that prefix's length, read back by the device
        path (the ids are then fetched only when a block is new)."""
        ids = seq.strategy.output(seq.state) if ready is None else None
        ready = len(ids) if ids is not None else ready
        size = seq.config.block_size
        end = seq.emitted + (ready - seq.emitted) // size * size
        if end <= seq.emitted:
            return None
        new = ids[seq.emitted:end] if ids is not None else self.device.answer(seq, seq.emitted, end)
        seq.emitted = end
        return RequestOutput(seq.id, new, False, None)

    def _finish(self, seq: Sequence) -> RequestOutput:
        seq.status = Status.FINISHED
        if seq.finish_reason == "abort":
            return RequestOutput(seq.id, [], True, "abort")
        if seq.error is not None:
            seq.finish_reason = "error"
            return RequestOutput(seq.id, [], True, "error", error=seq.error)
        ids = seq.strategy.output(seq.state)
        seq.stats.generated_tokens = counted_tokens(ids, self.spec)
        seq.stats.hit_round_cap = seq.state.hit_round_cap
        stopped = any(t in self.spec.eos_ids for t in ids)
        seq.finish_reason = "stop" if stopped and not seq.state.hit_round_cap else "length"
        new, seq.emitted = ids[seq.emitted:], len(ids)
        return RequestOutput(seq.id, new, True, seq.finish_reason, RunOutput(ids, seq.stats, seq.state.trace))

    # -- the loop ---------------------------------------------------------------------------------------
    def generate(self, seqs: list[Sequence], on_step: Callable[[Sequence], None] | None = None,
                 on_finish: Callable[[Sequence, RunOutput], None] | None = None) -> list[RunOutput]:
        """Decode every sequence (queued FIFO, at most max_num_seqs at once); results in the given order.
        ``on_step(seq)`` runs after each decode step a sequence took part in (progress bars; ``seq.state.canvas``
        is current, on either path); not after its prefill, nor after a partial step that left it waiting."""
        results: dict[str, RunOutput] = {}
        by_id = {s.id: s for s in seqs}
        for seq in seqs:
            self.add(seq)
        while len(results) < len(seqs):
            if not self.has_work():
                raise RuntimeError("the engine stopped with requests unfinished")
            step_seqs = [s for s in self.scheduler.running if s.status is Status.RUNNING]
            steps = self.counters.steps
            try:
                outs = self.step()
            except BaseException as err:
                self.fail_all(err)
                raise
            for out in outs:
                if out.error is not None:
                    self.fail_all(out.error)
                    raise out.error
                if out.finished and out.request_id in by_id:
                    results[out.request_id] = out.result
                    if on_finish is not None:
                        on_finish(by_id[out.request_id], out.result)
            if on_step is not None:
                ran = set(self.last_step.request_ids) if self.counters.steps > steps else set()  # a partial step
                for s in (s for s in step_seqs if s.id in ran):  # left the deferred ones out of its forward
                    if s.on_device:  # its host state is stale while it decodes on the device: bring the canvas
                        self.device.refresh(s)
                    on_step(s)
        return [results[s.id] for s in seqs]
