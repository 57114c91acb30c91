"""Reference decoding loops of SDAR and Fast-dLLM v2, written from their published semantics over transformers'
Qwen3ForCausalLM / Qwen2ForCausalLM and its DynamicCache (float64): the extra-forward loops lopa must equal.

Both: blocks aligned at position 0; the prompt's whole blocks prefilled block-causally; a denoising forward
over the active block reads the cache and is then cropped off it; a finished block is cached by one more
forward over the clean block. The mask id is never proposed (as in lopa)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache


def hf_twin(loaded, folder, dtype=torch.float64):
    """transformers' Qwen3ForCausalLM (SDAR) / Qwen2ForCausalLM (Fast-dLLM v2) with a tiny folder's weights."""
    cfg = loaded.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                  attn_implementation="eager")
    if cfg.model_type == "sdar":
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=cfg.head_dim, attention_bias=False, **common))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    state = {k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.to(dtype).eval()


class Ref:
    """One request's canvas, cache and forward count over an HF twin."""

    def __init__(self, hf, spec, prompt, gen_length, size):
        self.hf, self.spec, self.size = hf, spec, size
        self.P, self.T = len(prompt), len(prompt) + gen_length
        self.x = torch.full((self.T,), spec.mask_id)
        self.x[: self.P] = torch.tensor(prompt)
        self.cache, self.forwards, self.stores = DynamicCache(), 0, 0  # decode forwards; those that cached a block

    def forward(self, lo, hi, keep):
        """Logits [hi - lo, V] of positions lo..hi over the cache (which holds [0, lo)); block-causal."""
        block = torch.arange(hi) // self.size
        allowed = block[None, :] <= block[lo:hi, None]
        mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
        with torch.no_grad():
            logits = self.hf(input_ids=self.x[None, lo:hi], attention_mask=mask[None, None], use_cache=True,
                             position_ids=torch.arange(lo, hi)[None], past_key_values=self.cache).logits[0]
        if not keep:
            self.cache.crop(-(hi - lo))  # transformers 5: crop(-n) drops the last n positions
        logits[:, self.spec.mask_id] = float("-inf")
        return logits

    def fill(self, probs_of, positions, tau):
        """Every masked position with p > tau, else the most confident (the lowest on ties)."""
        open_ = [p for p in positions if self.x[p] == self.spec.mask_id]
        best = {p: probs_of(p).max(-1) for p in open_}
        chosen = [p for p in open_ if best[p].values > tau] or [max(open_, key=lambda p: (best[p].values, -p))]
        for p in chosen:
            self.x[p] = best[p].indices

    def eos_at(self):
        hits = [i for i in range(self.P, self.T) if int(self.x[i]) in self.spec.eos_ids]
        return hits[0] if hits else None

    def answer(self):
        eos = self.eos_at()
        ids = self.x[self.P: eos + 1 if eos is not None else self.T]
        holes = (ids == self.spec.mask_id).nonzero()
        return ids[: int(holes[0])].tolist() if len(holes) else ids.tolist()


def sdar_reference(hf, spec, prompt, gen_length, size, tau):
    """SDAR's loop: per block, denoise until complete, then cache it; stop after a block once an EOS exists."""
    r = Ref(hf, spec, prompt, gen_length, size)
    n = r.P // size * size
    if n:
        r.forward(0, n, keep=True)
    for s in range(n, r.T, size):
        e = min(s + size, r.T)
        while bool((r.x[s:e] == spec.mask_id).any()):
            probs = torch.softmax(r.forward(s, e, keep=False), -1)
            r.forwards += 1
            r.fill(lambda p: probs[p - s], range(s, e), tau)
        r.forward(s, e, keep=True)  # the extra forward: cache the finished block
        r.forwards += 1
        r.stores += 1
        if r.eos_at() is not None:
            break
    return r


def fast_dllm_v2_reference(hf, spec, prompt, gen_length, size, sub, tau):
    """Fast-dLLM v2's loop: sub-blocks left to right; the forward over a finished block caches it and gives the
    next block's first token; stop once the first EOS has no mask before it."""
    r = Ref(hf, spec, prompt, gen_length, size)

    def stop():
        eos = r.eos_at()
        return eos is not None and not bool((r.x[r.P:eos] == spec.mask_id).any())

    n = r.P // size * size
    if n:
        logits = r.forward(0, n, keep=True)
        if n == r.P:
            r.x[n] = logits[-1].argmax()
    for s in range(n, r.T, size):
        e = min(s + size, r.T)
        for a in range(s, e, sub):
            b = min(a + sub, e)
            while bool((r.x[a:b] == spec.mask_id).any()) and not stop():
                probs = torch.softmax(r.forward(s, e, keep=False), -1)
                r.forwards += 1
                r.fill(lambda p: probs[p - s - 1], range(a, b), tau)  # position p from the state at p - 1
        if stop() or e == r.T:
            break
        logits = r.forward(s, e, keep=True)  # the finished block: cached, and its last state gives the next token
        r.forwards += 1
        r.stores += 1
        r.x[e] = logits[-1].argmax()
        if stop():
            break
    return r
