"""OpenAI request schemas, request -> (prompt ids, DecodeConfig), and the response / chunk / error bodies.

Requests are validated strictly (pydantic strict mode, unknown fields refused), so a wrong type or a
field lopa does not implement is a 400 that names the field. lopa's own decoding settings come as extra
body fields (``extra_body={"strategy": "lopa", "k": 3}`` in the openai client) and are range-checked by
``DecodeConfig``. Counting in ``usage``: completion_tokens = generated tokens up to and including the
first EOS (lopa's Stats.generated_tokens); decode_forwards and tpf as in lopa's Stats; prefill apart.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from ..config import DecodeConfig, base_type, decode_config, settings
from ..errors import ConfigError
from .. import request

OPENAI_FIELDS = ("temperature", "top_p", "seed")  # DecodeConfig fields OpenAI's schema already names
# lopa's own DecodeConfig fields a request may set by name (extra body), derived from their declaration
# (config.py: the server's hidden ones are listed in config.hidden_settings("server")).
LOPA_FIELDS = tuple(f.name for f in settings("server") if f.name not in OPENAI_FIELDS)
# DecodeConfig field -> the request field that set it, so a ConfigError names what the client sent.
REQUEST_FIELD = {"gen_length": "max_tokens"}
STRICT = ConfigDict(extra="forbid", strict=True)
# Every lopa field optional: None keeps the preset's / model family's value. Types and ranges are DecodeConfig's.
_LopaFields = create_model("_LopaFields", __config__=STRICT, preset=(Optional[str], None),
                           **{f.name: (Optional[base_type(f)], None) for f in settings("server")
                              if f.name in LOPA_FIELDS})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(_LopaFields):
    """Fields shared by /v1/completions and /v1/chat/completions (and lopa's, from _LopaFields)."""

    model_config = STRICT

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None  # absent: a fresh random seed (OpenAI's behaviour); irrelevant when greedy
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"lopa returns one choice per request; n must be 1, got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError(f"penalties are not supported; must be 0, got {v}")
        return v

    # OpenAI fields lopa does not implement (each subclass has some of them): set to anything but their off value
    @field_validator("logit_bias", "echo", "logprobs", "top_logprobs", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return v

    @field_validator("stream_options")
    @classmethod
    def _needs_a_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):  # OpenAI refuses it too: it would do nothing
            raise ValueError("only allowed when stream is true")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def gen_length(self) -> Optional[int]:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError(f"lopa takes one prompt per request, got {len(v)}")
        if not v or v == [""]:
            raise ValueError("must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v):
        if v not in (None, 1):
            raise ValueError(f"best_of must be 1, got {v}")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal[request.ROLES]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_length(cls, v, info: ValidationInfo):
        other = info.data.get("max_tokens")
        if None not in (v, other) and v != other:
            raise ValueError(f"{v} disagrees with max_tokens {other}; pass one of them")
        return v

    def gen_length(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- request -> what the engine needs ------------------------------------------------------------------
def prompt_ids(req: CompletionRequest, tokenizer, spec) -> list[int]:
    """Token ids of a completion prompt, checked as lopa.generate checks them (lopa/request.py)."""
    prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
    return request.prompt_ids(tokenizer, spec, prompt)


def chat_ids(req: ChatRequest, tokenizer, spec) -> list[int]:
    """The messages through the model's chat template (with the assistant's generation prompt), encoded."""
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name is not None else {})}
                for m in req.messages]
    return request.prompt_ids(tokenizer, spec, messages=messages)


def decode_settings(req: _Request, model_type: str, n_prompt: int, context: int,
                    prompt_field: str = "prompt", step_rows: Optional[int] = None) -> DecodeConfig:
    """The request's DecodeConfig: its preset (or the family's defaults), lopa fields, then OpenAI's fields,
    checked against the model and the engine (``step_rows``: its RunnerConfig.step_rows) as lopa.generate does.

    Without max_tokens the preset's gen_length applies. Prompt + gen_length must fit the model's context."""
    overrides = {name: getattr(req, name) for name in LOPA_FIELDS if getattr(req, name) is not None}
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if req.gen_length() is not None:
        overrides["gen_length"] = req.gen_length()
    if req.temperature is not None:
        overrides["temperature"] = req.temperature
    if req.top_p is not None:
        overrides["top_p"] = req.top_p
    overrides["seed"] = req.seed if req.seed is not None else secrets.randbits(31)
    cfg = request.check_config(decode_config(req.preset, model_type, **overrides), model_type=model_type,
                               step_rows=step_rows)
    if n_prompt + cfg.gen_length > context:
        name = field if req.gen_length() is not None and n_prompt < context else prompt_field
        raise ConfigError(f"{name}: prompt ({n_prompt} tokens) + max_tokens ({cfg.gen_length}) exceeds the "
                          f"model's context ({context})")
    return cfg


def error_param(err: ConfigError) -> Optional[str]:
    """The request field a ConfigError names ("tau: must be ..." -> "tau")."""
    head = str(err).split(":", 1)[0]
    if " " in head or not head:
        return None
    return REQUEST_FIELD.get(head, head)


# -- response bodies --------------------------------------------------------------------------------
def usage(prompt_tokens: int, stats) -> dict:
    """OpenAI usage plus lopa's counts (stats: lopa Stats of the finished request)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt_tokens + stats.generated_tokens,
            "decode_forwards": stats.decode_forwards, "prefill_forwards": stats.prefill_forwards,
            "tpf": stats.tpf}


def lopa_block(config: DecodeConfig, stats) -> dict:
    return {"strategy": config.strategy, "k": config.k, "branch_rows": stats.branch_rows,
            "hit_round_cap": stats.hit_round_cap}


def completion_body(rid: str, model: str, text: str, finish: str, use: dict, lopa: dict) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use, "lopa": lopa}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict, lopa: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use, "lopa": lopa}


def chunk(chat: bool, rid: str, model: str, created: int, text: Optional[str], finish: Optional[str] = None,
          role: bool = False, use: Optional[dict] = None, with_usage: bool = False) -> dict:
    """One SSE chunk. text None with use set = the final usage-only chunk (choices empty)."""
    if chat:
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        body = {"id": rid, "object": "text_completion", "created": created, "model": model}
    body["choices"] = [] if use is not None else choices
    if with_usage:
        body["usage"] = use
    return body


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
