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


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        specials = [dict(v, id=int(k)) for k, v in self.config.get("added_tokens_decoder", {}).items()]
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
        template = self.config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template: str | None = template

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
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.config.get("bos_token") or "", eos_token=self.config.get("eos_token") or "",
        )
