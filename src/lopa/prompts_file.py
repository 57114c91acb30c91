"""`lopa generate --prompts-file`: many prompts from one file, with per-prompt decoding fields.

A file named .jsonl / .json / .ndjson holds one JSON object a line: "prompt" (text or token ids) or
"messages" (a chat), plus any DecodeConfig field the prompts file takes (config.settings("prompts_file")).
A .json file may instead hold one JSON array of such objects.
Any other file holds one text prompt a line (blank lines skipped). A plain file whose lines look like JSONL
objects is refused rather than decoded as text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import DecodeConfig, decode_config, settings
from .errors import ConfigError
from .request import check_messages, check_text

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Entry:
    line: int  # 1-based line of the file (of a .json array: item)
    prompt: object  # text, token ids, or a chat (a list of message dicts)
    fields: dict  # the DecodeConfig fields this line sets
    where: str = ""  # "prompts_file: PATH line N" (or "item N"), for errors


def read_prompts(path: Path) -> list[Entry]:
    lines = _lines(path)
    if path.suffix.lower() == ".json" and lines[0][1].lstrip().startswith("["):  # one JSON array of objects
        items = _parse(f"prompts_file: {path}", "\n".join(line for _, line in lines))
        if not isinstance(items, list) or not items:
            raise ConfigError(f"prompts_file: {path} must hold a non-empty JSON array of objects, or one object a line")
        return [_entry(f"prompts_file: {path} item {i}", i, obj) for i, obj in enumerate(items, 1)]
    if path.suffix.lower() in JSONL_SUFFIXES:
        return [_entry(f"prompts_file: {path} line {i}", i, _parse(f"prompts_file: {path} line {i}", line))
                for i, line in lines]
    first = lines[0][1].strip()
    if first.startswith("{") and _looks_like_entry(first):
        raise ConfigError(f"prompts_file: {path} holds JSON objects but is read as one text prompt a line "
                          f"(its name does not end in {' / '.join(JSONL_SUFFIXES)}): rename it to .jsonl")
    return [Entry(i, line, {}, f"prompts_file: {path} line {i}") for i, line in lines]


def configs(entries: list[Entry], path: Path, preset: str | None, model_type: str, flags: dict) -> list[DecodeConfig]:
    """Each entry's DecodeConfig: the preset (or the family's defaults), the command's flags, then its own fields."""
    out = []
    for e in entries:
        try:
            out.append(decode_config(preset, model_type, **{**flags, **e.fields}))
        except ConfigError as err:
            raise ConfigError(f"{e.where or f'prompts_file: {path} line {e.line}'}: {err}") from None
    return out


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.expanduser().read_bytes().decode("utf-8-sig")  # a leading BOM is not part of the first prompt
    except OSError as err:
        raise ConfigError(f"prompts_file: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompts_file: {path} is not UTF-8 text (byte {err.start})") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"prompts_file: {path} holds no prompt")
    return lines


def _looks_like_entry(line: str) -> bool:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and bool({"prompt", "messages"} & set(obj))


def _parse(where: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not JSON ({err.msg}, line {err.lineno})") from None


def _entry(where: str, i: int, obj) -> Entry:
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise ConfigError(f"{where} must be an object with 'prompt' or 'messages' (one of them)")
    names = {f.name for f in settings("prompts_file")}
    unknown = set(obj) - names - {"prompt", "messages"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; a line takes 'prompt' or 'messages' and "
                          f"{sorted(names)}")
    try:
        if "messages" in obj:
            prompt = check_messages(obj.pop("messages"))
        else:
            prompt = obj.pop("prompt")
            if isinstance(prompt, str):
                check_text("prompt", prompt)
            elif not (isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
                raise ConfigError(f"prompt: must be text or a list of integer token ids, got {json.dumps(prompt)[:60]}")
            if not prompt:
                raise ConfigError("prompt: must not be empty")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Entry(i, prompt, obj, where)
