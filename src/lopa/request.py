"""One request's inputs, checked once for every front end (the API, the CLI through it, the server): the prompt
as token ids and the DecodeConfig, against the model and the engine that will run them.

Nothing here guesses: a value of the wrong type or out of range is a ConfigError naming the field, never a
reinterpretation (bytes are not token ids, a string is not a list of prompts, a dict is not a DecodeConfig).
"""

from __future__ import annotations

import operator

from .config import DecodeConfig, decode_config
from .errors import ConfigError
from .models.spec import ModelSpec

ROLES = ("system", "developer", "user", "assistant")  # the chat roles lopa and its server accept
MESSAGE_KEYS = ("role", "content", "name")


def check_text(field: str, text) -> str:
    """A str that encodes as UTF-8 (lone surrogates come from bytes that were not UTF-8)."""
    if not isinstance(text, str):
        raise ConfigError(f"{field}: must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{field}: not valid UTF-8 text (character {err.start}: {text[err.start]!r})") from None
    return text


def check_messages(messages, field: str = "messages") -> list[dict]:
    """A chat: a non-empty list of {"role": one of ROLES, "content": str (, "name": str)} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(f"{field}: must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got "
                          f"{type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ConfigError(f"{field}[{i}]: must be a dict with 'role' and 'content', got {m!r}")
        unknown = sorted(set(m) - set(MESSAGE_KEYS), key=str)
        if unknown:
            raise ConfigError(f"{field}[{i}]: unknown key(s) {unknown}; a message has {MESSAGE_KEYS}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{field}[{i}].role: must be one of {ROLES}, got {m['role']!r}")
        for key in ("content", "name"):
            if key in m:
                check_text(f"{field}[{i}].{key}", m[key])
    return [dict(m) for m in messages]


def check_token_ids(field: str, prompt, spec: ModelSpec) -> list[int]:
    """Token ids: a list or tuple of ints (or a 1-D integer tensor / array), each in [0, vocab). Not bytes (their
    values are not ids), not a set (no order), not bools."""
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):  # torch / numpy
        if getattr(prompt, "ndim", 1) != 1:
            raise ConfigError(f"{field}: token ids must be one-dimensional, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise ConfigError(f"{field}: must be text (str) or token ids (a list of int), got {type(prompt).__name__}")
    ids = []
    for i, t in enumerate(prompt):
        if isinstance(t, bool):
            raise ConfigError(f"{field}[{i}]: token ids are integers, got {t!r}")
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise ConfigError(f"{field}[{i}]: token ids are integers, got {t!r} ({type(t).__name__})") from None
    bad = [t for t in ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise ConfigError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")
    return ids


def prompt_ids(tokenizer, spec: ModelSpec, prompt=None, *, chat: bool = False, messages=None) -> list[int]:
    """The prompt's token ids: text (through the chat template with ``chat=True``), token ids, or ``messages``.

    Refused: both or neither of prompt / messages, an empty prompt, and a prompt holding the mask token (a
    diffusion model reads it as a position to fill: the dream sampler would overwrite it)."""
    if not isinstance(chat, bool):
        raise ConfigError(f"chat: must be True or False, got {chat!r}")
    field = "prompt"
    if messages is not None:
        if prompt is not None:
            raise ConfigError("messages: pass either prompt or messages, not both")
        field = "messages"
        ids = tokenizer.encode(tokenizer.apply_chat_template(check_messages(messages)))
    elif prompt is None:
        raise ConfigError("prompt: give a prompt (text or token ids) or messages")
    elif isinstance(prompt, str):
        check_text("prompt", prompt)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        ids = tokenizer.encode(text)
    else:
        if chat:
            raise ConfigError("chat: a chat template needs a text prompt, not token ids")
        ids = check_token_ids("prompt", prompt, spec)
    if not ids:
        raise ConfigError(f"{field}: must not be empty")
    if spec.mask_id in ids:
        raise ConfigError(f"{field}: holds the mask token (id {spec.mask_id}) at position {ids.index(spec.mask_id)}: "
                          f"the model would read it as a position to fill; remove it")
    return ids


def resolve_config(config, preset, overrides: dict, *, model_type: str, step_rows: int | None,
                   block_size: int | None = None) -> DecodeConfig:
    """``config`` (a DecodeConfig) or a ``preset`` / the model family's defaults, plus field overrides; checked
    against the model and the engine (``check_config``). ``block_size``: the block size a block-diffusion model
    was trained with (ModelSpec.block_size), used unless the caller names one."""
    if config is not None and not isinstance(config, DecodeConfig):
        raise ConfigError(f"config: must be a DecodeConfig or None, got {type(config).__name__}; pass fields as "
                          f"keyword arguments (generate(model, prompt, k=3)) or DecodeConfig(**fields)")
    if config is None:
        if block_size is not None and "block_size" not in overrides:
            overrides = {**overrides, "block_size": block_size}
        config = decode_config(preset, model_type, **overrides)
    elif preset is not None:
        raise ConfigError("preset: pass either config or preset, not both")
    elif overrides:
        config = config.replace(**overrides)
    return check_config(config, model_type=model_type, step_rows=step_rows)


def check_config(config: DecodeConfig, *, model_type: str, step_rows: int | None) -> DecodeConfig:
    """What a DecodeConfig alone cannot know: the model family and the engine's step row budget.

    k_policy "load" sizes each iteration's lookahead from the engine's RunnerConfig.step_rows; an engine
    without one is refused here (at admission, before the request queues) rather than run as "fixed"."""
    if config.compat == "published" and model_type != "dream":
        raise ConfigError(f"compat: 'published' follows the published Dream code; this is a {model_type} model")
    if config.strategy == "lopa" and config.k_policy == "load" and step_rows is None:
        raise ConfigError("k_policy: 'load' shares the engine's step row budget, and this engine has none: set "
                          "RunnerConfig.step_rows (--step-rows of lopa generate / eval / serve), or use k_policy "
                          "'fixed' or 'text'")
    return config
