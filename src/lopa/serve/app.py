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

from ..config import ServeConfig
from ..errors import EngineDeadError, LopaError
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


def create_app(model, config: ServeConfig | None = None, engine=None) -> FastAPI:
    """An app serving ``model`` (a LopaModel). ``engine`` defaults to model.engine (tests may wrap it)."""
    config = config or ServeConfig()
    engine = engine if engine is not None else model.engine
    name = config.served_model_name or model.path.name
    tokenizer, context = model.tokenizer, model.config.max_position_embeddings
    vocab = model.config.vocab_size
    metrics = Metrics()
    device = getattr(getattr(engine, "runner", None), "device", None)  # the engine thread sets it current
    core = AsyncEngine(engine, config.max_pending, device=device,
                       on_delivery=lambda d: metrics.on_step(d.step, d.running, d.waiting, core.pending,
                                                            getattr(engine, "counters", None)))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        core.start()
        yield
        await core.shutdown()

    app = FastAPI(title="lopa", lifespan=lifespan)
    app.state.core, app.state.metrics, app.state.served_model_name = core, metrics, name

    async def error_response(_request: Request, exc: Exception) -> JSONResponse:
        err = classify(exc)
        metrics.requests.labels(outcome(err.status)).inc()
        return JSONResponse(protocol.error_body(err.message, err.type, err.param, err.code), err.status,
                            headers=err.headers)

    for kind in (ApiError, ValidationError, LopaError, RequestTimeout, RequestFailed, Cancelled, HTTPException,
                 Exception):
        app.add_exception_handler(kind, error_response)

    def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_metrics_key(request: Request) -> None:
        if not config.metrics_public:
            require_key(request)

    async def admit(request: Request, schema, chat: bool) -> Job:
        req = schema.model_validate_json(await request.body())
        if req.model != name:
            raise ApiError(400, f"model: this server serves {name!r}, got {req.model!r}", param="model",
                           code="model_not_found")
        ids = protocol.chat_ids(req, tokenizer) if chat else protocol.prompt_ids(req, tokenizer, vocab)
        cfg = protocol.decode_settings(req, model.model_type, len(ids), context,
                                       prompt_field="messages" if chat else "prompt")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        seq = engine.prepare(ids, cfg, request_id=rid, stream=req.stream)
        box = core.submit(seq)
        metrics.prompt_tokens.inc(len(ids))
        loop = asyncio.get_running_loop()
        return Job(rid, chat, req, cfg, len(ids), box, loop.time() + config.request_timeout_s, time.perf_counter())

    async def outputs(job: Job):
        """The job's RequestOutputs until its last; raises what the engine loop sent, or RequestTimeout (a
        timer puts it in the box at the deadline: asyncio.wait_for would swallow a cancellation on 3.11)."""
        timer = asyncio.get_running_loop().call_at(job.deadline, job.box.put_nowait, RequestTimeout(
            f"request ran past {config.request_timeout_s} s and was aborted"))
        first = True
        try:
            while True:
                item = await job.box.get()
                if isinstance(item, BaseException):
                    job.done = not isinstance(item, RequestTimeout)
                    raise item
                if item.finished:
                    job.done = True
                    if item.finish_reason == "abort":
                        raise Cancelled("the request was aborted: the server is shutting down")
                    if item.finish_reason == "error":
                        raise RequestFailed(f"the request failed in the engine: {type(item.error).__name__}: "
                                            f"{item.error}")
                    metrics.on_finished(item.result.stats, time.perf_counter() - job.t0)
                if first and job.req.stream and item.new_ids:  # what a streaming client waits for
                    metrics.first_block_s.observe(time.perf_counter() - job.t0)
                    first = False
                yield item
                if item.finished:
                    return
        finally:
            timer.cancel()

    def abandon(job: Job) -> bool:
        """Abort a request that has not finished (its KV is freed); True if there was one."""
        if job.done:
            return False
        core.abort(job.rid)
        job.done = True
        return True

    def finish_reason(out, text: TextStream) -> str:
        return "stop" if text.stopped else out.finish_reason

    async def collect(job: Job) -> dict:
        text = TextStream(tokenizer, job.req.stops)
        async for out in outputs(job):
            text.push(out.new_ids, out.finished)
            if out.finished:
                stats = out.result.stats
                body = protocol.chat_body if job.chat else protocol.completion_body
                metrics.requests.labels("ok").inc()
                return body(job.rid, name, text.text, finish_reason(out, text),
                            protocol.usage(job.n_prompt, stats), protocol.lopa_block(job.config, stats))
        raise AssertionError("unreachable: outputs() ends with a finished output")

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def answer(request: Request, job: Job) -> Response:
        if job.req.stream:
            return EventStream(sse(job), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collector = asyncio.ensure_future(collect(job))
        watcher = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():  # the client went away first
                if abandon(job):
                    metrics.requests.labels("cancelled").inc()
                return Response(status_code=499)  # nobody reads this
            return JSONResponse(collector.result())  # or raises: error_response answers
        finally:
            watcher.cancel()
            collector.cancel()
            abandon(job)  # timed out, or this handler was cancelled

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(job: Job):
        text = TextStream(tokenizer, job.req.stops)
        created, usage = int(time.time()), job.req.include_usage
        try:
            if job.chat:
                yield event(protocol.chunk(True, job.rid, name, created, "", role=True, with_usage=usage))
            async for out in outputs(job):
                delta = text.push(out.new_ids, out.finished)
                if not out.finished:
                    if delta:
                        yield event(protocol.chunk(job.chat, job.rid, name, created, delta, with_usage=usage))
                    continue
                yield event(protocol.chunk(job.chat, job.rid, name, created, delta, finish_reason(out, text),
                                           with_usage=usage))
                if usage:
                    use = protocol.usage(job.n_prompt, out.result.stats)
                    yield event(protocol.chunk(job.chat, job.rid, name, created, None, use=use, with_usage=True))
                metrics.requests.labels("ok").inc()
                yield "data: [DONE]\n\n"
        except (EngineDeadError, Cancelled, RequestTimeout, RequestFailed) as exc:  # the stream ends in an error
            abandon(job)
            err = classify(exc)
            metrics.requests.labels(outcome(err.status)).inc()
            yield event(protocol.error_body(err.message, err.type, err.param, err.code))
        finally:  # the client went away (the generator is closed) before the end
            if abandon(job):
                metrics.requests.labels("cancelled").inc()

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: Request) -> Response:
        return await answer(request, await admit(request, protocol.CompletionRequest, chat=False))

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request) -> Response:
        return await answer(request, await admit(request, protocol.ChatRequest, chat=True))

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lopa"}]}

    @app.get("/health")
    async def health() -> Response:
        if core.alive:
            return JSONResponse({"status": "ok", "in_flight": core.pending})
        return JSONResponse(protocol.error_body(f"the engine is not running ({core.dead!r})", "server_error",
                                                code="engine_unavailable"), 503)

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)])
    async def prometheus() -> Response:
        metrics.in_flight.set(core.pending)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
