"""Train lopa's embedded default model: a small Dream-architecture dLLM with the D2F recipe; or, with
``objective="block_diffusion"``, a small SDAR-architecture block-diffusion model (see make_bd_batch).

The recipe (Discrete Diffusion Forcing, teacher-free variant):
- a sequence is the prompt (block 0) followed by answer blocks of `block_size` tokens; the answer ends with
  EOS, padded with EOS to the end of its block plus one whole block of EOS (so "after EOS comes EOS");
- mask ratios increase monotonically from block to block: per sequence, m ratios drawn uniformly and sorted,
  block j's tokens masked independently with the j-th smallest (at least one token masked);
- attention is block-causal over blocks (D2F's mask) for a fraction of batches and fully bidirectional for
  the rest, so that both the d2f pipeline and full-attention windows (threshold, LoPA's window) are in
  distribution;
- the loss is cross-entropy on masked answer positions only, with Dream's shift (position i is predicted
  from the hidden state at i-1).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunnerConfig, check_types
from ..errors import ConfigError
from ..models.attention import block_causal_mask
from ..models.config import ModelConfig
from ..models.loader import save_folder
from ..models.tiny import train_tokenizer, write_tokenizer
from ..models.tokenizer import Tokenizer
from ..models.transformer import Transformer
from ..problems.code import code_split
from ..problems.gsm import math_split, prompt_for
from .block_diffusion import bd_loss, make_bd_batch


OBJECTIVES = ("d2f", "block_diffusion")


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default_model"
    minutes: float = 8.0  # wall-clock budget; the learning-rate schedule follows elapsed time
    max_steps: int = 1_000_000
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    vocab_size: int = 768
    block_size: int = 32
    full_attention_fraction: float = 0.5
    n_train: int = 200_000  # distinct math problems
    n_code: int = 1_500  # distinct code tasks (lopa.problems.code; about 1,950 exist in the train split)
    code_copies: int = 5  # each code task appears this many times in the training pool (~4% of it)
    max_answer_tokens: int = 160
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    objective: str = "d2f"  # "d2f" (a Dream-layout model) | "block_diffusion" (an SDAR-layout model, clean context)

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("minutes", "max_steps", "batch_size", "lr", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "vocab_size", "block_size", "n_train", "code_copies", "max_answer_tokens",
                    "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "n_code"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.full_attention_fraction <= 1.0:
            raise ConfigError(f"full_attention_fraction: must be in [0, 1], got {self.full_attention_fraction}")
        RunnerConfig(device=self.device)  # the same device rule as everywhere ("auto", "cpu", "cuda[:N]")


def training_texts(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(prompt, answer) texts: the math problems, then each code task ``code_copies`` times (prompt = signature
    and docstring as `lopa eval --task code` shows them, answer = the function body)."""
    texts = [(prompt_for(ex), ex["answer"]) for ex in math_split("train", cfg.n_train, seed=cfg.seed)]
    if cfg.n_code:
        code = [(t["prompt"], t["canonical_solution"]) for t in code_split("train", cfg.n_code, seed=cfg.seed)]
        texts += code * cfg.code_copies
    return texts


def encode_examples(tok: Tokenizer, texts: list[tuple[str, str]], cfg: TrainConfig, eos: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS padding to the end of its block + one more EOS block)."""
    out = []
    for prompt_text, answer_text in texts:
        prompt = tok.encode(prompt_text)
        answer = tok.encode(answer_text)[: cfg.max_answer_tokens] + [eos]
        padded = -(-len(answer) // cfg.block_size) * cfg.block_size + cfg.block_size
        out.append((prompt, answer + [eos] * (padded - len(answer))))
    return out


def make_batch(pairs, cfg: TrainConfig, mask_id: int, eos: int, rng: torch.Generator):
    """tokens (masked) [B, T], targets [B, T], loss mask [B, T], block ids [B, T] (prompt 0, pad = last+1)."""
    T = max(len(p) + len(a) for p, a in pairs)
    B = len(pairs)
    tokens = torch.full((B, T), eos, dtype=torch.long)
    block = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, a) in enumerate(pairs):
        seq = torch.tensor(p + a)
        n_blocks = len(a) // cfg.block_size
        tokens[b, : len(seq)] = seq
        ids = torch.arange(len(a)) // cfg.block_size + 1
        block[b, len(p): len(seq)] = ids
        block[b, len(seq):] = n_blocks + 1
        ratios = torch.rand(n_blocks, generator=rng).sort().values  # monotonically increasing per block
        masked = torch.rand(len(a), generator=rng) < ratios[ids - 1]
        if not masked.any():
            masked[torch.randint(len(a), (1,), generator=rng)] = True
        loss_mask[b, len(p): len(seq)] = masked
    targets = tokens.clone()
    tokens[loss_mask] = mask_id
    return tokens, targets, loss_mask, block


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = training_texts(cfg)
    hf_tok = train_tokenizer([p + a for p, a in texts], cfg.vocab_size)
    ids = write_tokenizer(hf_tok, out, "json")
    tok = Tokenizer(out)
    mask_id, eos = ids["<|mask|>"], ids["<|endoftext|>"]
    pairs = encode_examples(tok, texts, cfg, eos)
    longest = max(len(p) + len(a) for p, a in pairs)
    bd = cfg.objective == "block_diffusion"  # an SDAR-layout model with the model's block size in config.json
    mcfg = ModelConfig(model_type="sdar" if bd else "dream", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       num_kv_heads=cfg.num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=max(512, 2 * longest), mask_token_id=mask_id, eos_token_id=eos,
                       pad_token_id=eos, block_size=cfg.block_size if bd else None)
    model = Transformer(mcfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                residual_out = name.endswith(("attn.o.weight", "mlp.down.weight"))  # GPT-2 style scaled init
                torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers) if residual_out else 0.02)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    rng = torch.Generator().manual_seed(cfg.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"training {params / 1e6:.2f}M parameters ({cfg.objective}, block {cfg.block_size}) on {device} "
          f"for {cfg.minutes} min, {len(pairs)} examples ({cfg.n_code} code tasks x {cfg.code_copies}), "
          f"vocab {cfg.vocab_size}, longest sequence {longest}", flush=True)
    log: list[tuple[int, float, float]] = []
    start, step, running = time.time(), 0, None
    budget = cfg.minutes * 60
    while step < cfg.max_steps and (elapsed := time.time() - start) < budget:
        frac = min(1.0, elapsed / budget)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = random.sample(pairs, cfg.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if bd:
                tensors = make_bd_batch(batch, cfg.block_size, mask_id, eos, rng)
                tokens, targets, loss_mask = (t.to(device) for t in tensors)
                loss = bd_loss(model, tokens, targets, loss_mask, cfg.block_size)
            else:
                loss = d2f_loss(model, batch, cfg, mask_id, eos, rng, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0:
            log.append((step, time.time() - start, running))
            if progress:
                print(f"step {step} | {time.time() - start:.0f}s | loss {running:.4f} | lr {lr:.2e}", flush=True)
    model.eval()
    save_folder(model, out, out, dtype=torch.bfloat16)
    (out / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "params": params, "steps": step,
                                                    "log": log}, indent=1))
    plot_loss(log, out / "loss.png")
    print(f"saved {out} after {step} steps, loss {running:.4f}", flush=True)
    return out


def d2f_loss(model: Transformer, batch, cfg: TrainConfig, mask_id: int, eos: int, rng: torch.Generator, device):
    """D2F's masked-token cross-entropy, block-causal or (full_attention_fraction of batches) bidirectional."""
    tokens, targets, loss_mask, block = (t.to(device) for t in make_batch(batch, cfg, mask_id, eos, rng))
    attn = None if random.random() < cfg.full_attention_fraction else block_causal_mask_batched(block)
    hidden = model(tokens, attn_mask=attn)
    logits = model.lm_head(hidden[:, :-1]).float()  # [B, T-1, V] predicts positions 1..T-1 (Dream shift)
    sel = loss_mask[:, 1:]
    return F.cross_entropy(logits[sel], targets[:, 1:][sel])


def block_causal_mask_batched(block: torch.Tensor) -> torch.Tensor:
    """[B, T] block ids -> [B, T, T] D2F mask (one per sequence: prompts differ in length)."""
    return torch.stack([block_causal_mask(b) for b in block])


def plot_loss(log, path: Path) -> None:
    if not log:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _, _ in log], [v for _, _, v in log])
    ax.set_xlabel("step")
    ax.set_ylabel("masked-token cross-entropy (EMA)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
