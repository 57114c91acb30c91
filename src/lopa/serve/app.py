"""The HTTP side of `lopa serve`: FastAPI routes over the engine thread (serve/engine_loop.py).

Request path: auth -> parse and validate (protocol.py) -> prompt ids and DecodeConfig -> engine.prepare
(host-only; a bad request stops here and never reaches the engine) -> submit (429 when full) -> stream
SSE chunks or collect the answer, aborting the request if the client goes away or its time runs out.
Every error becomes OpenAI's {"error": {...}} body in one place (serve/errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..api import LopaModel
from ..config import ServeConfig
from ..errors import ConfigError, EngineDeadError, LopaError
from . import protocol
from .engine_loop import AsyncEngine
from .errors import ApiError, Cancelled, RequestFailed, RequestTimeout, classify, outcome
from .metrics import Metrics
from .text import TextStream


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator when the response ends (client gone, server
    cancelled it, or done), so the generator's ``finally`` aborts an unfinished request right away."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@dataclass
class Job:
    """One admitted request as the handler sees it."""

    rid: str
    chat: bool
    req: protocol._Request
    config: object  # DecodeConfig
    n_prompt: int
    box: asyncio.Queue
    deadline: float
    t0: float
    done: bool = False  # its final output arrived (or the engine died): nothing to abort


class Server:
    """One served model: admission, the engine thread (``core``), answers and metrics. The routes of
    ``create_app`` are thin calls into it."""

    def __init__(self, model, config: ServeConfig, engine) -> None:
        self.model, self.config, self.engine = model, config, engine
        self.name = config.served_model_name or model.path.name
        self.tokenizer, self.spec = model.tokenizer, model.loaded.spec
        self.context = model.config.max_position_embeddings
        self.metrics = Metrics()
        device = getattr(getattr(engine, "runner", None), "device", None)  # the engine thread sets it current
        self.core = AsyncEngine(engine, config.max_pending, device=device, on_delivery=self._on_delivery)

    def _on_delivery(self, d) -> None:
        self.metrics.on_step(d.step, d.running, d.waiting, self.core.pending, getattr(self.engine, "counters", None))

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        self.core.start()
        yield
        await self.core.shutdown()

    async def error_response(self, _request: Request, exc: Exception) -> JSONResponse:
        err = classify(exc)
        self.metrics.requests.labels(outcome(err.status)).inc()
        return JSONResponse(protocol.error_body(err.message, err.type, err.param, err.code), err.status,
                            headers=err.headers)

    def require_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_metrics_key(self, request: Request) -> None:
        if not self.config.metrics_public:
            self.require_key(request)

    # -- one request --------------------------------------------------------------------------------
    async def admit(self, request: Request, schema, chat: bool) -> Job:
        """Parse and check the request (nothing malformed reaches the engine), then queue it (429 when full)."""
        req = schema.model_validate_json(await request.body())
        if req.model != self.name:
            raise ApiError(400, f"model: this server serves {self.name!r}, got {req.model!r}", param="model",
                           code="model_not_found")
        ids = (protocol.chat_ids(req, self.tokenizer, self.spec) if chat
               else protocol.prompt_ids(req, self.tokenizer, self.spec))
        cfg = protocol.decode_settings(req, self.model.model_type, len(ids), self.context,
                                       prompt_field="messages" if chat else "prompt",
                                       step_rows=getattr(self.engine, "step_rows", None))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        seq = self.engine.prepare(ids, cfg, request_id=rid, stream=req.stream)
        box = self.core.submit(seq)
        self.metrics.prompt_tokens.inc(len(ids))
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        return Job(rid, chat, req, cfg, len(ids), box, deadline, time.perf_counter())

    async def outputs(self, job: Job):
        """The job's RequestOutputs until its last; raises what the engine loop sent, or RequestTimeout (a
        timer puts it in the box at the deadline: asyncio.wait_for would swallow a cancellation on 3.11)."""
        timer = asyncio.get_running_loop().call_at(job.deadline, job.box.put_nowait, RequestTimeout(
            f"request ran past {self.config.request_timeout_s} s and was aborted"))
        first = True
        try:
            while True:
                item = await job.box.get()
                if isinstance(item, BaseException):
                    job.done = not isinstance(item, RequestTimeout)
                    raise item
                if item.finished:
                    job.done = True
                    _raise_unless_ok(item)
                    self.metrics.on_finished(item.result.stats, time.perf_counter() - job.t0)
                if first and job.req.stream and item.new_ids:  # what a streaming client waits for
                    self.metrics.first_block_s.observe(time.perf_counter() - job.t0)
                    first = False
                yield item
                if item.finished:
                    return
        finally:
            timer.cancel()

    def abandon(self, job: Job) -> bool:
        """Abort a request that has not finished (its KV is freed); True if there was one."""
        if job.done:
            return False
        self.core.abort(job.rid)
        job.done = True
        return True

    async def collect(self, job: Job) -> dict:
        text = TextStream(self.tokenizer, job.req.stops)
        async for out in self.outputs(job):
            text.push(out.new_ids, out.finished)
            if out.finished:
                stats = out.result.stats
                body = protocol.chat_body if job.chat else protocol.completion_body
                self.metrics.requests.labels("ok").inc()
                return body(job.rid, self.name, text.text, _finish_reason(out, text),
                            protocol.usage(job.n_prompt, stats), protocol.lopa_block(job.config, stats))
        raise AssertionError("unreachable: outputs() ends with a finished output")

    async def answer(self, request: Request, job: Job) -> Response:
        """The job's answer: an event stream, or one JSON body raced against the client going away."""
        if job.req.stream:
            return EventStream(self.sse(job), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collector = asyncio.ensure_future(self.collect(job))
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():  # the client went away first
                if self.abandon(job):
                    self.metrics.requests.labels("cancelled").inc()
                return Response(status_code=499)  # nobody reads this
            return JSONResponse(collector.result())  # or raises: error_response answers
        finally:
            watcher.cancel()
            collector.cancel()
            self.abandon(job)  # timed out, or this handler was cancelled

    async def sse(self, job: Job):
        text = TextStream(self.tokenizer, job.req.stops)
        created, usage, chunk = int(time.time()), job.req.include_usage, protocol.chunk
        try:
            if job.chat:
                yield _event(chunk(True, job.rid, self.name, created, "", role=True, with_usage=usage))
            async for out in self.outputs(job):
                delta = text.push(out.new_ids, out.finished)
                if not out.finished:
                    if delta:
                        yield _event(chunk(job.chat, job.rid, self.name, created, delta, with_usage=usage))
                    continue
                yield _event(chunk(job.chat, job.rid, self.name, created, delta, _finish_reason(out, text),
                                   with_usage=usage))
                if usage:
                    use = protocol.usage(job.n_prompt, out.result.stats)
                    yield _event(chunk(job.chat, job.rid, self.name, created, None, use=use, with_usage=True))
                self.metrics.requests.labels("ok").inc()
                yield "data: [DONE]\n\n"
        except (EngineDeadError, Cancelled, RequestTimeout, RequestFailed) as exc:  # the stream ends in an error
            self.abandon(job)
            err = classify(exc)
            self.metrics.requests.labels(outcome(err.status)).inc()
            yield _event(protocol.error_body(err.message, err.type, err.param, err.code))
        finally:  # the client went away (the generator is closed) before the end
            if self.abandon(job):
                self.metrics.requests.labels("cancelled").inc()

    # -- routes -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self.answer(request, await self.admit(request, protocol.CompletionRequest, chat=False))

    async def chat_completions(self, request: Request) -> Response:
        return await self.answer(request, await self.admit(request, protocol.ChatRequest, chat=True))

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "lopa"}]}

    async def health(self) -> Response:
        if self.core.alive:
            return JSONResponse({"status": "ok", "in_flight": self.core.pending})
        return JSONResponse(protocol.error_body(f"the engine is not running ({self.core.dead!r})", "server_error",
                                                code="engine_unavailable"), 503)

    async def prometheus(self) -> Response:
        self.metrics.in_flight.set(self.core.pending)
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)


def _raise_unless_ok(item) -> None:
    """A finished output that is not an answer: aborted by the shutdown, or its strategy failed."""
    if item.finish_reason == "abort":
        raise Cancelled("the request was aborted: the server is shutting down")
    if item.finish_reason == "error":
        raise RequestFailed(f"the request failed in the engine: {type(item.error).__name__}: {item.error}")


def _finish_reason(out, text: TextStream) -> str:
    return "stop" if text.stopped else out.finish_reason


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(model, config: ServeConfig | None = None, engine=None) -> FastAPI:
    """An app serving ``model`` (a LopaModel). ``engine`` defaults to model.engine (tests may wrap it)."""
    if not isinstance(model, LopaModel):
        raise ConfigError(f"model: must be a LopaModel from lopa.load_model(), got {type(model).__name__}")
    if config is not None and not isinstance(config, ServeConfig):
        raise ConfigError(f"config: must be a ServeConfig or None, got {type(config).__name__}")
    server = Server(model, config or ServeConfig(), engine if engine is not None else model.engine)
    app = FastAPI(title="lopa", lifespan=server.lifespan)
    app.state.server, app.state.core, app.state.metrics = server, server.core, server.metrics
    app.state.served_model_name = server.name
    for kind in (ApiError, ValidationError, LopaError, RequestTimeout, RequestFailed, Cancelled, HTTPException,
                 Exception):
        app.add_exception_handler(kind, server.error_response)
    key, metrics_key = [Depends(server.require_key)], [Depends(server.require_metrics_key)]
    app.add_api_route("/v1/completions", server.completions, methods=["POST"], dependencies=key)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"], dependencies=key)
    app.add_api_route("/v1/models", server.models, methods=["GET"], dependencies=key)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"], dependencies=metrics_key)
    return app
