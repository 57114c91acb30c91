"""Every error of the HTTP side -> its status and OpenAI's error fields: the one table (design §10).

    ConfigError, PromptTooLongError, validation (pydantic), chat template, unknown model   400
    missing or wrong API key                                                               401
    QueueFullError (the in-flight bound)                                                   429 + Retry-After
    EngineDeadError, BranchParallelError, aborted by shutdown                              503
    RequestTimeout (ServeConfig.request_timeout_s)                                         504
    RequestFailed (its strategy raised in the engine), anything else                       500
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..errors import (BranchParallelError, CheckpointError, ConfigError, EngineDeadError, LopaError, PromptTooLongError,
                      QueueFullError)
from . import protocol


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


class RequestFailed(Exception):
    """This request's strategy failed inside the engine (finish_reason "error"); the others go on."""


class RequestTimeout(Exception):
    """The request ran past ServeConfig.request_timeout_s and was aborted."""


class Cancelled(Exception):
    """The engine aborted the request (server shutdown)."""


def classify(exc: Exception) -> ApiError:
    """Every error -> its HTTP status and OpenAI error fields (the one table of design §10)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc)
        return ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=param,
                        code="invalid_json" if first["type"] == "json_invalid" else "invalid_value")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), param=protocol.error_param(exc), code="invalid_value")
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, CheckpointError):  # chat template refused the conversation, or the model has none
        return ApiError(400, str(exc), param="messages", code="invalid_value")
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, (EngineDeadError, BranchParallelError, Cancelled)):
        return ApiError(503, str(exc) or "the server is shutting down", "server_error", code="engine_unavailable")
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), "timeout", code="request_timeout")
    if isinstance(exc, RequestFailed):
        return ApiError(500, str(exc), "server_error", code="request_failed")
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)
    if isinstance(exc, LopaError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def outcome(status: int) -> str:
    """The lopa_requests_total status of an error answer."""
    return "rejected" if status < 500 else "cancelled" if status == 504 else "error"
