"""The engine thread: one background thread owns the Engine; the event loop talks to it through queues.

    event loop                                   lopa-engine thread (inference_mode)
    submit(seq) -> asyncio.Queue  --("add")-->   inbox drained between steps: engine.add / engine.abort
    abort(id)                     --("abort")->  outs = engine.step()
    _deliver(batch) <-- call_soon_threadsafe --  one Delivery per step: outputs + step info

Only the engine thread calls engine.add / abort / step (the engine is not thread-safe); only the event
loop touches the outboxes and the pending count. A step that raises kills the engine (engine.fail_all
empties it): the log says why, every waiter gets the error (EngineDeadError), and so does every later submit
and /health. A request whose own strategy failed, or whose step ran out of memory (the engine fails that
step's requests itself), ends alone (finish_reason "error"); the engine and the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..errors import EngineDeadError, QueueFullError

log = logging.getLogger("lopa.serve")


@dataclass
class Delivery:
    """What one engine step hands to the event loop."""

    outputs: list  # RequestOutput
    step: object | None  # engine.last_step (StepInfo) or None
    running: int
    waiting: int


@dataclass
class Failure:
    """The engine died: the exception for every waiter."""

    error: BaseException
    ids: list[str] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine, max_pending: int, device: torch.device | None = None, on_delivery=None) -> None:
        self.engine = engine
        self.max_pending = max_pending
        if device is not None and device.type == "cuda" and device.index is None:  # "cuda": the current GPU,
            device = torch.device("cuda", torch.cuda.current_device())  # read here (the engine thread starts at 0)
        self.device = device
        self.on_delivery = on_delivery  # called in the event loop with each Delivery (metrics)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", seq) | ("abort", id) | ("stop",)
        self.outboxes: dict[str, asyncio.Queue] = {}  # event-loop thread only
        self.dead: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Requests in flight (waiting + running), counted in the event loop until their last output."""
        return len(self.outboxes)

    @property
    def alive(self) -> bool:
        return self.dead is None and self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="lopa-engine", daemon=True)
        self.thread.start()

    def submit(self, seq) -> asyncio.Queue:
        """Queue a prepared Sequence; its RequestOutputs arrive on the returned queue (an Exception on death)."""
        if not self.alive:
            why = f" ({self.dead!r})" if self.dead else ""
            raise EngineDeadError(f"the engine is not running{why}")
        if self.pending >= self.max_pending:
            raise QueueFullError(f"{self.pending} requests in flight (max_pending {self.max_pending}); retry later")
        box: asyncio.Queue = asyncio.Queue()
        self.outboxes[seq.id] = box
        self.inbox.put(("add", seq))
        return box

    def abort(self, seq_id: str) -> None:
        """Cancel a request; its final output (finish_reason "abort") still arrives and frees its place."""
        if seq_id in self.outboxes:
            self.inbox.put(("abort", seq_id))

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort what is still in flight, stop the thread and join it."""
        if self.thread is None:
            return
        self.inbox.put(("stop",))
        await asyncio.to_thread(self.thread.join, timeout_s)

    # -- event-loop side --------------------------------------------------------------------------------
    def _deliver(self, item: Delivery | Failure) -> None:
        if isinstance(item, Failure):
            self.dead = item.error
            err = EngineDeadError(f"the engine failed: {type(item.error).__name__}: {item.error}")
            for box in self.outboxes.values():
                box.put_nowait(err)
            self.outboxes.clear()
            return
        for out in item.outputs:
            box = self.outboxes.get(out.request_id)
            if box is None:
                continue
            box.put_nowait(out)
            if out.finished:
                del self.outboxes[out.request_id]
        if self.on_delivery is not None:
            self.on_delivery(item)

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        live: set[str] = set()  # ids added and not yet finished: aborts of anything else are dropped
        try:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.inference_mode():
                stopping = False
                while not stopping or self.engine.has_work():
                    stopping = self._drain(live, block=not self.engine.has_work()) or stopping
                    if stopping:
                        for seq_id in list(live):
                            self.engine.abort(seq_id)
                        live.clear()
                    if not self.engine.has_work():
                        continue
                    outs = self.engine.step()
                    for out in outs:
                        if out.finished:
                            live.discard(out.request_id)
                    delivery = Delivery(outs, self.engine.last_step, self.engine.num_running, self.engine.num_waiting)
                    self.loop.call_soon_threadsafe(self._deliver, delivery)
        except BaseException as err:  # noqa: BLE001 (a failed step kills the engine; every waiter hears why)
            log.error("the engine stopped; every request now gets 503 until a restart", exc_info=err)
            fail_all = getattr(self.engine, "fail_all", None)
            if fail_all is not None:
                try:
                    fail_all(err)  # leaves the engine empty (slots freed); the waiters are answered by Failure
                except Exception:  # noqa: BLE001 - the engine is dead either way
                    pass
            self.loop.call_soon_threadsafe(self._deliver, Failure(err))
            return
        self.loop.call_soon_threadsafe(self._deliver, Failure(EngineDeadError("the engine was shut down")))

    def _drain(self, live: set[str], block: bool) -> bool:
        """Apply queued adds and aborts; True once a stop was read. Blocks for the first item when idle."""
        stop = False
        while True:
            try:
                msg = self.inbox.get(block=block)
            except queue.Empty:
                return stop
            block = False
            if msg[0] == "add":
                self.engine.add(msg[1])
                live.add(msg[1].id)
            elif msg[0] == "abort" and msg[1] in live:
                self.engine.abort(msg[1])
            elif msg[0] == "stop":
                stop = True
