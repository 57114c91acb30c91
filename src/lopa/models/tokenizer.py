"""Tokenizers from a model folder: tokenizer.json, else Qwen2-style byte-level BPE from vocab.json + merges.txt.

Special tokens come from tokenizer_config.json (`added_tokens_decoder`), the chat template from
`chat_template` there or chat_template.jinja. Nothing is fetched and no remote code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError
from .files import field, read_json_object, read_text

# Qwen2's pre-tokenizer pattern: digits split one by one, words with an optional leading non-letter.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _bpe_from_files(folder: Path, specials: list[dict]) -> HFTokenizer:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            merges.append(tuple(line.split(" ")))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their declared ids (Dream's sit right after the BPE vocabulary).
    for spec in sorted(specials, key=lambda s: s["id"]):
        token = AddedToken(spec["content"], special=spec.get("special", True), normalized=False)
        if spec.get("special", True):
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(spec["content"])
        if got != spec["id"]:
            raise CheckpointError(f"{folder}: added token {spec['content']!r} declared with id {spec['id']}, got {got}")
    return tok


def _added_tokens(config: dict, path: Path) -> list[dict]:
    """tokenizer_config.json's ``added_tokens_decoder``: {"<id>": {"content": str, "special": bool}, ...}."""
    decoder = field(config, path, "added_tokens_decoder", dict, default={})
    specials = []
    for key, spec in decoder.items():
        if not key.isdigit() or not isinstance(spec, dict) or not isinstance(spec.get("content"), str) \
                or not isinstance(spec.get("special", True), bool):
            raise CheckpointError(f"{path}: added_tokens_decoder[{key!r}] must map an id to "
                                  f"{{'content': str, 'special': bool}}, got {spec!r}")
        specials.append(dict(spec, id=int(key)))
    return specials


def _chat_template(config: dict, path: Path) -> str | None:
    """``chat_template``: a string, or HF's list of named templates (the one named "default")."""
    value = field(config, path, "chat_template", (str, list))
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: field 'chat_template' is a list without a 'default' template string")
    return value


def _token_text(config: dict, path: Path, name: str) -> str:
    """bos_token / eos_token: a string, or HF's serialized AddedToken {"content": ...}; "" when absent."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: field {name!r} must be a string or {{'content': str}}, got {config[name]!r}")
    return value or ""


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        self.config = read_json_object(cfg_path) if cfg_path.is_file() else {}
        specials = _added_tokens(self.config, cfg_path)
        try:
            if (folder / "tokenizer.json").is_file():
                self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                self._tok = _bpe_from_files(folder, specials)
            else:
                raise CheckpointError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
        except CheckpointError:
            raise
        except Exception as err:  # corrupt tokenizer files: name the folder, not a deep traceback
            raise CheckpointError(f"{folder}: cannot read tokenizer files ({err})") from None
        template = _chat_template(self.config, cfg_path)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = read_text(folder / "chat_template.jinja")
        self.chat_template: str | None = template
        self.bos_token = _token_text(self.config, cfg_path, "bos_token")
        self.eos_token = _token_text(self.config, cfg_path, "eos_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise CheckpointError("this model's tokenizer_config.json has no chat_template; drop --chat")
        import jinja2

        def raise_exception(message: str):  # HF chat templates call this on malformed conversations
            raise CheckpointError(f"chat template: {message}")

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except jinja2.TemplateError as err:
            raise CheckpointError(f"chat template: cannot render it ({type(err).__name__}: {err})") from None
