"""Branch Parallel's comm layer: which branch rows each rank computes, and the collectives of one step.

The runner holds one group. ``LocalGroup`` (one process) computes every row and sends nothing, so every
single-device run goes through the same runner code. ``BranchGroup`` (torch.distributed: NCCL between GPUs,
gloo between CPU processes; a gloo control group beside it) spreads each request's K rows over N ranks:

    rows      split_rows(K, N): balanced contiguous parts (sizes differ by <= 1), row 0 on rank 0;
              K = 1 (prefill, k = 0, the dream sampler) is replicated: every rank computes it, no traffic
    split     the host path's step (ModelRunner.execute): this rank's rows of each request, and the layouts
              its packed predictions gather by (LocalGroup: every item whole, None)
    local_rows  the device path's (engine/device.py): (first, count) [B] of this rank's rows of each slot, as
              tensors (rows_of; LocalGroup: None = every row)
    gather    ONE all_gather of the step's local predictions -> every rank holds every row's, in global row
              order: ``gather`` (eager: the logit columns), ``gather_packed`` (the static path: the packed step,
              then the step's one copy to the host), ``gather_rows`` (the device path: on the device, put in
              order by in_row_order); LocalGroup returns them as they are (gather_packed: copied to the host)
    source    where a winner's window K/V come from: the rank's own rows, or the owner's broadcast
    broadcast Commit-Winner-Cache: ONE packed broadcast per owning rank per step (window K/V + last hidden)
    sync      the control plane: rank 0 ships the engine's joins/aborts (or stop) before every step
    check     the debug mode (RunnerConfig.bp_check): every rank's lengths, canvases and K/V agree

The engine's side of the control plane is four calls, the same on every group, so the engine never asks which
rank it runs on or how many there are:

    group.record(event)            an engine event (Event: a join, an abort, a fail_all) for the workers
    group.step(run)                one engine step: ship the recorded events, then run(); a step that raises
                                   leaves the group failed (the ranks are out of step)
    group.follow(apply, run)       a worker's loop: apply(event) for each of rank 0's events, then run(),
                                   until rank 0 stops the group
    group.survives(err)            whether the engine may go on after a step raised err (one process: an
                                   out-of-memory; several ranks: never, they would be out of step)

LocalGroup runs the step directly and records nothing; a BranchGroup of one rank (NCCL on one GPU) does the same.

Sampled requests are never replicated: each rank's generator draws only for its own rows, so K = 1 sampled
rows live on rank 0 and travel like split rows (every rank then holds the same draws).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Callable, TypeVar

import torch

from ..decoding.base import Predictions
from ..errors import BranchParallelError
from .memory import is_oom
from .step import StepItem

CTRL_TIMEOUT = timedelta(days=7)  # workers wait on rank 0 between generate calls; a dead peer still fails at once


# An engine event, shipped pickled from rank 0 to the workers before the next step:
#   ("add", request_id, prompt, DecodeConfig, stream) | ("abort", request_id) | ("fail_all", "Type: message")
Event = tuple
T = TypeVar("T")


def split_rows(K: int, world: int, replicate: bool = True) -> list[range]:
    """Rows of each rank: contiguous, balanced, rank 0 first. K = 1 and replicate: every rank computes row 0."""
    if K == 1 and replicate:
        return [range(0, 1)] * world
    q, r = divmod(K, world)
    parts, start = [], 0
    for rank in range(world):
        n = q + (rank < r)
        parts.append(range(start, start + n))
        start += n
    return parts


def _first_row(rank, size: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """split_rows' first row of ``rank`` (an int or a tensor) when K = size * N + extra: ranks < extra hold size + 1
    rows, the others size."""
    return rank * size + extra.clamp(max=rank)


def rows_of(K: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split_rows on the device, replicated: (first, count) [B] of ``rank``'s rows of each slot's K [B] rows."""
    size, extra = K // world, K % world
    first, count = _first_row(rank, size, extra), size + (extra > rank).long()
    one = K == 1  # every rank computes row 0
    return torch.where(one, 0, first), torch.where(one, 1, count)


def in_row_order(gathered: torch.Tensor, K: torch.Tensor, W: torch.Tensor, rank: int) -> torch.Tensor:
    """The inverse of rows_of: every rank's packed predictions [N, B, Qb, 3] (rank r's rows of slot b numbered 0..
    locally, query local_row * W + c) -> [B, N * Qb, 3], row r column c of slot b at query r * W[b] + c (K[b] * W[b]
    <= N * Qb; the queries past it are padding, copies of others). K = 1 is replicated: read from ``rank``'s own
    copy, as the host path does."""
    N, B, Qb, _ = gathered.shape
    W, K = W.clamp(min=1)[:, None], K[:, None]
    q = torch.arange(N * Qb, device=gathered.device)[None]
    r, c = q // W, q % W  # [B, N * Qb] the global row and column of each query
    size, extra = K // N, K % N
    cut = extra * (size + 1)  # the rows of the ranks holding size + 1
    owner = torch.where(r < cut, r // (size + 1), extra + (r - cut) // size.clamp(min=1))
    owner = torch.where(K == 1, rank, owner).clamp(0, N - 1)
    local = torch.where(K == 1, 0, r - _first_row(owner, size, extra)) * W + c
    index = (owner * B + torch.arange(B, device=q.device)[:, None]) * Qb + local.clamp(0, Qb - 1)
    return gathered.reshape(-1, 3)[index.reshape(-1)].view(B, N * Qb, 3)


def _rows(item: StepItem, rows: range) -> StepItem:
    """The rows of item this rank computes: local branch ids 0..K_r-1 (only their equality matters), written at
    P + local_row * W (Pre-Write into this rank's own slot scratch)."""
    if len(rows) == item.batch.tokens.shape[0]:
        return item
    b = item.batch
    lengths = None if b.lengths is None or not len(rows) else b.lengths[rows.start:rows.stop]
    batch = replace(b, tokens=b.tokens[rows.start:rows.stop], lengths=lengths)
    return replace(item, batch=batch)


@dataclass
class Source:
    """Where one commit's K/V come from on this rank."""

    local_row: int | None  # this rank's row whose window K/V are committed; None = it receives them
    owner: int  # the rank that computed the winner
    broadcast: bool  # the owner sends the window to the others


@dataclass
class BPCounters:
    """Engine-wide, cumulative, on every rank (rank 0's are the run's), over decode steps (prefill steps are
    replicated and send nothing; the control sync of every step counts). Times are host wall seconds (on a GPU
    they include the waits for the device only where a phase reads its results: forward ends with the copy of
    the predictions to the host; commit is queued, not waited for, unless sync_timers)."""

    split_steps: int = 0  # steps with at least one request whose rows were spread
    gathers: int = 0  # all_gather calls
    gather_bytes: int = 0  # bytes each rank contributed to them
    commits: int = 0  # commits of spread requests
    broadcasts: int = 0  # broadcast calls (at most one per owning rank per step)
    commit_bytes: int = 0  # bytes broadcast (window K/V + last hidden states)
    control_bytes: int = 0  # control-plane payload bytes (joins/aborts), beside one 24-byte header per step
    prewrite_bytes: int = 0  # K/V bytes this rank wrote speculatively into its slots' scratch (its rows)
    prepare_s: float = 0.0  # control sync + splitting the step into this rank's rows
    forward_s: float = 0.0  # this rank's forward (Pre-Write included), predictions to the host
    gather_s: float = 0.0  # the all_gather and putting the rows back in global order
    select_s: float = 0.0  # the strategies' accept (replicated on every rank)
    commit_s: float = 0.0  # Commit-Winner-Cache: local copies, packing, broadcasts, unpacking
    check_s: float = 0.0  # the consistency check (bp_check)
    checks: int = 0
    kv_max_diff: float = 0.0  # largest |K/V| difference any check saw between a rank and rank 0

    @property
    def bytes_per_commit(self) -> float:
        return self.commit_bytes / self.broadcasts if self.broadcasts else 0.0

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bytes_per_commit"] = self.bytes_per_commit
        return out


class LocalGroup:
    """One process: every row here, nothing sent."""

    rank, world, is_root, device, commit_mode, check, sync_timers = 0, 1, True, None, "broadcast", False, False
    distributed = False

    def __init__(self) -> None:
        self.counters = BPCounters()

    def split(self, items: list[StepItem], shapes) -> tuple[list[StepItem], None]:
        return items, None

    def local_rows(self, K: torch.Tensor) -> None:
        return None  # every row

    def source(self, K: int, row: int, replicate: bool) -> Source:
        return Source(row, 0, False)

    def gather(self, preds: list[Predictions], shapes, dtype) -> list[Predictions]:
        return preds

    def gather_packed(self, packed: torch.Tensor, layouts: None) -> torch.Tensor:
        return packed.cpu()[None]  # the step's one device-to-host copy

    def gather_rows(self, packed: torch.Tensor, K: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return packed

    def record(self, event: Event) -> None:
        """Nobody to tell."""

    def step(self, run: Callable[[], T]) -> T:
        return run()

    def follow(self, apply: Callable[[Event], None], run: Callable[[], object]) -> None:
        raise RuntimeError("a single process has no rank 0 to follow")

    def survives(self, err: BaseException) -> bool:
        return is_oom(err)  # the step's frames are gone with its allocations; the other requests go on

    def close(self) -> None:
        pass


class BranchGroup:
    """This rank's view of a torch.distributed group of N ranks (launch.py builds it)."""

    distributed = True  # its collectives run even with one rank (the NCCL path on one GPU)

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float, commit_mode: str = "broadcast",
                 check: bool = False, procs: list | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        # all_gather_single is the newer name (torch >= 2.13) of all_gather_into_tensor: [N*B, ...] <- [B, ...]
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.rank, self.world, self.device = rank, world, device
        self.is_root = rank == 0
        self.timeout_s, self.commit_mode, self.check = timeout_s, commit_mode, check
        self.procs = procs or []  # rank 0 on one host: the started workers (launch.Worker)
        self.ctrl = dist.new_group(backend="gloo", timeout=CTRL_TIMEOUT)
        self.counters = BPCounters()
        self.sync_timers = False  # benchmarks: wait for the device at the end of each phase
        self.steps = 0
        self.failed: str | None = None
        self.stopped = False  # rank 0 sent (or a worker received) the stop
        self.closed = False
        self.events: list[Event] = []  # rank 0: the engine's events since the last step, shipped by the next

    # -- where rows live --------------------------------------------------------------------------------
    def split(self, items: list[StepItem], shapes: list[tuple[int, int, bool]]
              ) -> tuple[list[StepItem], list[list[range]] | None]:
        """This rank's rows of each item (shapes: (K, W, replicate) per item) and the layouts of the packed
        predictions' gather (runner/step.py: split): per item the rows each rank computed, a replicated row from
        rank 0's copy; None when every row is replicated (nothing to gather)."""
        parts = [split_rows(K, self.world, rep) for K, _, rep in shapes]
        local = [_rows(item, p[self.rank]) for item, p in zip(items, parts)]
        spread = [not (K == 1 and rep) for K, _, rep in shapes]
        return local, [p if s else p[:1] for p, s in zip(parts, spread)] if any(spread) else None

    def local_rows(self, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device path's split: (first, count) [B] of this rank's rows of each slot's K [B] rows."""
        return rows_of(K, self.rank, self.world)

    def source(self, K: int, row: int, replicate: bool) -> Source:
        parts = split_rows(K, self.world, replicate)
        if K == 1 and replicate:
            return Source(0, 0, False)
        owner = next(r for r, p in enumerate(parts) if row in p)
        mine = parts[self.rank]
        if self.commit_mode == "local" and K >= self.world:
            # single-phase: every rank commits its own first row's copy of the leading columns (equal to the
            # winner's only under block-causal attention, and only if the rows round the same)
            return Source(0, owner, False)
        return Source(row - mine.start if owner == self.rank else None, owner, True)

    # -- collectives ----------------------------------------------------------------------------------
    def _guard(self, what: str, fn):
        if self.failed:
            raise BranchParallelError(f"the branch-parallel group failed earlier ({self.failed}); close the model")
        try:
            return fn()
        except BranchParallelError:
            raise
        except Exception as err:  # DistBackendError, RuntimeError (timeouts, closed sockets)
            first = str(err).splitlines()[0] if str(err) else ""
            self.failed = f"rank {self.rank}, {what}: {type(err).__name__}: {first}"
            raise BranchParallelError(f"branch parallel: {self.failed}") from err

    def _wait(self, work) -> None:
        """Wait for an async collective. gloo applies the group's timeout itself; an NCCL kernel is polled from
        the host so that a hung peer raises instead of blocking the next device-to-host copy forever."""
        if self.device.type != "cuda":
            work.wait()
            return
        self._poll(work, "collective")

    def _poll(self, work, what: str, pause: float = 0.0) -> None:
        """Wait for ``work`` from the host, checking the spawned ranks, until bp_timeout_s has passed."""
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not done after {self.timeout_s} s (bp_timeout_s)")
            self.check_alive()
            if pause:
                time.sleep(pause)
        work.wait()

    def check_alive(self) -> None:
        if self.failed:
            raise BranchParallelError(f"the branch-parallel group failed earlier ({self.failed}); close the model")
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                self.failed = f"rank {rank} exited (code {proc.exitcode})"
                raise BranchParallelError(f"branch parallel: {self.failed}")

    def gather(self, preds: list[Predictions], shapes: list[tuple[int, int, bool]], dtype) -> list[Predictions]:
        """preds: this rank's rows of each request ([K_r, C]); shapes: (K, C, replicate) per request. Returns
        every request's Predictions [K, C] in global row order, identical on every rank."""
        spread = [b for b, (K, C, rep) in enumerate(shapes) if C > 0 and not (K == 1 and rep)]
        if not spread:
            return preds
        t0 = time.perf_counter()
        parts = {b: split_rows(shapes[b][0], self.world, shapes[b][2]) for b in spread}
        Q = max(max(len(p) for p in parts[b]) * shapes[b][1] for b in spread)  # the same on every rank
        local = torch.zeros(len(spread), Q, 3, dtype=dtype)
        for i, b in enumerate(spread):
            p = preds[b]
            n = p.tokens.numel()
            local[i, :n] = torch.stack([p.tokens.to(dtype), p.prob.to(dtype), p.conf.to(dtype)], -1).view(n, 3)
        local = local.to(self.device)
        out = torch.empty(self.world * len(spread), Q, 3, dtype=dtype, device=self.device)
        self._guard("all_gather of the predictions",
                    lambda: self._wait(self._all_gather(out, local, async_op=True)))
        host = out.cpu().view(self.world, len(spread), Q, 3)
        preds = list(preds)
        for i, b in enumerate(spread):
            C = shapes[b][1]
            full = torch.cat([host[r, i, :len(p) * C].view(len(p), C, 3) for r, p in enumerate(parts[b])])
            preds[b] = Predictions(full[..., 0].long(), full[..., 1], full[..., 2])
        c = self.counters
        c.gathers += 1
        c.gather_bytes += local.numel() * local.element_size()
        c.split_steps += 1
        c.gather_s += time.perf_counter() - t0
        return preds

    def gather_packed(self, packed: torch.Tensor, layouts: list[list[range]] | None) -> torch.Tensor:
        """The static path's packed predictions [B, Qb, 3] (device, the same shape on every rank) -> every rank's,
        [N, B, Qb, 3] on the host: ONE all_gather, then one device-to-host copy. ``layouts`` None (split: every
        row replicated): this rank's alone, [1, B, Qb, 3], nothing sent."""
        if layouts is None:
            return packed.cpu()[None]
        if self.sync_timers and packed.is_cuda:
            torch.cuda.synchronize(packed.device)  # the forward's time stays the forward's
        t0 = time.perf_counter()
        host = self._gather_device(packed).cpu()
        self.counters.gather_s += time.perf_counter() - t0
        return host

    def gather_rows(self, packed: torch.Tensor, K: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The device path's (engine/device.py) packed local predictions [B, Qb, 3] (rows local_rows gave, the
        same shape on every rank) -> every row's in global order [B, N * Qb, 3] (in_row_order), on the device:
        ONE all_gather, nothing copied to the host. K, W: the slots' rows and widths [B]."""
        t0 = time.perf_counter()
        preds = in_row_order(self._gather_device(packed), K, W, self.rank)
        self.counters.gather_s += time.perf_counter() - t0
        return preds

    def _gather_device(self, packed: torch.Tensor) -> torch.Tensor:
        """ONE all_gather of a packed [B, Qb, 3] -> [N, B, Qb, 3] on its device, counted."""
        out = torch.empty(self.world * packed.shape[0], *packed.shape[1:], dtype=packed.dtype, device=packed.device)
        self._guard("all_gather of the predictions",
                    lambda: self._wait(self._all_gather(out, packed.contiguous(), async_op=True)))
        c = self.counters
        c.gathers += 1
        c.gather_bytes += packed.numel() * packed.element_size()
        c.split_steps += 1
        return out.view(self.world, *packed.shape)

    def broadcast(self, pool, hidden, work: list) -> None:
        """Commit-Winner-Cache for ``work`` [(slot, index, local_row | None, owner, W, P, n)]: each owner packs
        its winners' window K/V [2, L, Hkv, n, D] and last hidden state [E] into ONE buffer and broadcasts it;
        the other ranks write it at [P, P + n) of the slot. Sizes are known on every rank: no size message."""
        kv = pool.kv
        L, Hkv, D, E = kv.shape[1], kv.shape[3], kv.shape[5], pool.last_hidden.shape[1]
        for owner in sorted({w[3] for w in work}):
            mine = [w for w in work if w[3] == owner]
            size = sum(2 * L * Hkv * n * D + E for *_, n in mine)
            if owner == self.rank:
                buf = torch.cat([t for slot, index, row, _, W, P, n in mine for t in (
                    kv[:, :, slot, :, P + row * W:P + row * W + n].reshape(-1), hidden[index, row * W + n - 1])])
            else:
                buf = torch.empty(size, dtype=kv.dtype, device=kv.device)
            self._guard(f"broadcast of rank {owner}'s winners",
                        lambda: self._wait(self.dist.broadcast(buf, src=owner, async_op=True)))
            if owner != self.rank:
                at = 0
                for slot, _, _, _, _, P, n in mine:
                    window = 2 * L * Hkv * n * D
                    kv[:, :, slot, :, P:P + n] = buf[at:at + window].view(2, L, Hkv, n, D)
                    pool.last_hidden[slot] = buf[at + window:at + window + E]
                    at += window + E
            self.counters.broadcasts += 1
            self.counters.commit_bytes += size * kv.element_size()
        self.counters.commits += len(work)

    # -- the engine's steps ---------------------------------------------------------------------------
    def record(self, event: Event) -> None:
        """Rank 0: keep ``event`` for the next step's sync. A worker records nothing: it is replaying them."""
        if self.is_root and self.world > 1:
            self.events.append(event)

    def step(self, run: Callable[[], T]) -> T:
        """Rank 0's engine step: ship the recorded events (timed as prepare), then run(); if it raises, the
        ranks are out of step and the group stays failed."""
        if self.world == 1:
            return run()
        t0 = time.perf_counter()
        self.sync(self.events)
        self.events = []
        self.counters.prepare_s += time.perf_counter() - t0
        try:
            return run()
        except Exception as err:
            self.failed = self.failed or f"rank {self.rank}'s step raised {type(err).__name__}"
            raise

    def follow(self, apply: Callable[[Event], None], run: Callable[[], object]) -> None:
        """A worker (rank > 0): apply rank 0's events in its order and take the same step, until rank 0 stops."""
        if self.is_root:
            raise RuntimeError("rank 0 leads the group; only a worker follows it")
        while (events := self.sync(None)) is not None:
            for event in events:
                apply(event)
            run()

    def survives(self, err: BaseException) -> bool:
        """One rank alone may go on after an out-of-memory, as one process does; several would be out of step."""
        return self.world == 1 and is_oom(err)

    def sync(self, events: list | None):
        """Before each engine step. Rank 0 sends its events (joins, aborts) and gets them back; a worker gets rank
        0's, or None when rank 0 stopped the group. One 24-byte header, plus the pickled events when any."""
        if self.is_root:
            self.check_alive()
            payload = pickle.dumps(events) if events else b""
            header = torch.tensor([0, len(payload), self.steps], dtype=torch.long)
        else:
            header = torch.zeros(3, dtype=torch.long)
        self._ctrl_broadcast(header, "control header")
        stop, size, step = (int(x) for x in header)
        if stop:
            self.stopped = True
            return None
        if step != self.steps:
            raise BranchParallelError(f"branch parallel: rank {self.rank} is at step {self.steps}, rank 0 at {step}")
        self.steps += 1
        if not size:
            return [] if events is None else events
        if self.is_root:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            data = torch.empty(size, dtype=torch.uint8)
        self._ctrl_broadcast(data, "control events")
        self.counters.control_bytes += size
        return events if self.is_root else pickle.loads(data.numpy().tobytes())

    def _ctrl_broadcast(self, tensor: torch.Tensor, what: str) -> None:
        def send():
            work = self.dist.broadcast(tensor, src=0, group=self.ctrl, async_op=True)
            if not self.is_root:
                work.wait()  # a worker waits for rank 0 as long as it takes (rank 0 gone: sockets close at once)
                return
            self._poll(work, what, pause=1e-4)
        self._guard(what, send)

    def ready(self) -> None:
        """Every rank loaded its model (rank 0 fails early if one died while loading)."""
        flag = torch.ones(1)
        def barrier():
            work = self.dist.all_reduce(flag, group=self.ctrl, async_op=True)
            while self.is_root and not work.is_completed():
                self.check_alive()
                time.sleep(0.01)
            work.wait()
        self._guard("start-up", barrier)

    def verify(self, pool, slots: list[int], canvases: list[torch.Tensor]) -> None:
        """The debug check after a commit: every rank's committed lengths and canvases equal rank 0's, and so does
        the committed K/V of the step's slots (in "broadcast" mode exactly; "local" mode records the difference)."""
        t0 = time.perf_counter()
        sums = [float((c * torch.arange(1, c.numel() + 1)).sum()) for c in canvases]  # position-weighted
        head = torch.tensor([float(pool.lengths[s]) for s in slots] + sums, dtype=torch.float64)
        heads = self._all_gather_host(head, "check of lengths and canvases")
        if not all(torch.equal(h, heads[0]) for h in heads):
            bad = [r for r, h in enumerate(heads) if not torch.equal(h, heads[0])]
            self.failed = f"ranks {bad} hold other lengths or canvases than rank 0"
            raise BranchParallelError(f"branch parallel check: {self.failed}")
        kv = torch.cat([pool.kv[:, :, s, :, :pool.lengths[s]].reshape(-1) for s in slots]  # committed only
                       + [pool.last_hidden[slots].reshape(-1)]).double().cpu()
        kvs = self._all_gather_host(kv, "check of the K/V")
        diff = max(float((x - kvs[0]).abs().max()) if x.numel() else 0.0 for x in kvs)
        c = self.counters
        c.kv_max_diff = max(c.kv_max_diff, diff)
        c.checks += 1
        c.check_s += time.perf_counter() - t0
        if diff and self.commit_mode == "broadcast":
            self.failed = f"the committed K/V differ between ranks by up to {diff:.3g}"
            raise BranchParallelError(f"branch parallel check: {self.failed}")

    def _all_gather_host(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        dev = x.to(self.device)
        out = [torch.empty_like(dev) for _ in range(self.world)]
        self._guard(what, lambda: self._wait(self.dist.all_gather(out, dev, async_op=True)))
        return [o.cpu() for o in out]

    def close(self) -> None:
        """Rank 0: tell the workers to stop, wait for them, leave the process group."""
        if self.closed:
            return
        self.closed = True
        if self.is_root and not self.failed and not self.stopped:
            self.stopped = True
            try:
                self._ctrl_broadcast(torch.tensor([1, 0, self.steps], dtype=torch.long), "stop")
            except BranchParallelError:
                pass
        for proc in self.procs:
            proc.join(timeout=0 if self.failed else 10)  # a failed group's workers may be hung: no waiting
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self.dist.is_initialized():
            try:
                self.dist.destroy_process_group()
            except Exception:  # a broken group may fail to tear down; the workers are gone either way
                pass
