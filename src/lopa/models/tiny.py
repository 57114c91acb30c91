"""Small random Dream / LLaDA / SDAR / Fast-dLLM v2 folders in the real layouts: for tests, the demo fallback,
fixtures and benchmarks.

Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from .config import ModelConfig
from .loader import save_folder
from .tokenizer import qwen2_pre_tokenizer
from .transformer import Transformer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
MASK_TOKENS = {"sdar": "<|MASK|>", "fast_dllm_v2": "|<MASK>|"}  # each family's own mask token (else <|mask|>)
TINY_BLOCK_SIZES = {"sdar": 4, "fast_dllm_v2": 8}  # small blocks, so tests cross several of them
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Answer: 3 + 4 = 7. He has 7 apples. #### 7",
    "def add(a, b):\n    return a + b\n",
    "A diffusion language model fills masked tokens in parallel.",
    "Sara reads 12 pages a day for 5 days, so she reads 12 * 5 = 60 pages.",
    "The cat sat on the mat. One two three four five six seven eight nine ten.",
]


def train_tokenizer(texts: list[str], vocab_size: int, specials: list[str] = SPECIAL_TOKENS) -> HFTokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer (digits split one by one); special tokens get the last ids."""
    tok = HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(specials)
    return tok


def write_tokenizer(tok: HFTokenizer, folder: Path, fmt: str = "json",
                    specials: list[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Write tokenizer.json ("json") or Dream's slow-tokenizer files vocab.json + merges.txt ("bpe").
    ``specials[3]`` is the mask token."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {t: tok.token_to_id(t) for t in specials}
    if fmt == "json":
        tok.save(str(folder / "tokenizer.json"))
    else:
        model = json.loads(tok.to_str())["model"]
        vocab = {k: v for k, v in model["vocab"].items() if k not in ids}
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "DreamTokenizer" if fmt == "bpe" else "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for t, i in ids.items()},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": specials[3], "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def write_tiny_checkpoint(
    path: str | Path,
    model_type: str = "dream",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 320,
    max_position_embeddings: int = 512,
    tokenizer: str = "json",
    logit_scale: float = 0.5,
    weight_std: float = 0.08,
    special_scale: float = 1.0,
    block_size: int | None = None,
) -> Path:
    """A complete random model folder. ``logit_scale`` (lm_head init std) sets how peaked predictions are;
    ``weight_std`` (every other matrix) how much they vary from position to position; ``special_scale``
    multiplies the lm_head rows of EOS and the mask token (> 1: they are predicted more often). ``block_size``:
    the block-diffusion families' trained block size (default TINY_BLOCK_SIZES)."""
    folder = Path(path)
    mask = MASK_TOKENS.get(model_type, "<|mask|>")
    specials = [*SPECIAL_TOKENS[:3], mask]
    tok = train_tokenizer(CORPUS, vocab_size, specials)
    ids = write_tokenizer(tok, folder, tokenizer, specials)
    if model_type == "fast_dllm_v2":  # its mask id lives in added_tokens.json (as in the published folders)
        (folder / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    # Fast-dLLM v2 (a Qwen2.5-Instruct model) stops on <|im_end|>; the others' config names <|endoftext|>
    eos = ids["<|im_end|>" if model_type == "fast_dllm_v2" else "<|endoftext|>"]
    cfg = ModelConfig(model_type=model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=max_position_embeddings, mask_token_id=ids[mask],
                      eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                      block_size=block_size or TINY_BLOCK_SIZES.get(model_type))
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = logit_scale if name == "lm_head.weight" else (1.0 if name == "embed.weight" else weight_std)
                p.copy_(std * torch.randn(p.shape, generator=gen))
        model.lm_head.weight[[cfg.eos_token_id, cfg.mask_token_id]] *= special_scale
    save_folder(model, folder, folder)
    return folder


def write_tiny_adapter(path: str | Path, base_dir: str | Path, r: int = 4, alpha: int = 8, seed: int = 0,
                       targets: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")) -> Path:
    """A PEFT-format LoRA folder for a tiny Dream checkpoint (names as PEFT writes them)."""
    base = ModelConfig.from_file(Path(base_dir) / "config.json")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dims = {"q_proj": (base.hidden_size, base.num_heads * base.head_dim),
            "k_proj": (base.hidden_size, base.num_kv_heads * base.head_dim),
            "v_proj": (base.hidden_size, base.num_kv_heads * base.head_dim),
            "o_proj": (base.num_heads * base.head_dim, base.hidden_size),
            "gate_proj": (base.hidden_size, base.intermediate_size), "up_proj": (base.hidden_size, base.intermediate_size),
            "down_proj": (base.intermediate_size, base.hidden_size)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(base.num_layers):
        for t in targets:
            group = "mlp" if t.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            name = f"base_model.model.model.layers.{i}.{group}.{t}"
            d_in, d_out = dims[t]
            tensors[f"{name}.lora_A.weight"] = 0.1 * torch.randn(r, d_in, generator=gen)
            tensors[f"{name}.lora_B.weight"] = 0.1 * torch.randn(d_out, r, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir)}, indent=2))
    return out
