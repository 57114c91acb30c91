"""From logits to per-position predictions and confidences, and the branch-confidence functions (Eq. 2).

Everything here is vectorized and stays on the logits' device until the final (small) copy to the CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import PredictSpec, Predictions


def predict(logits: torch.Tensor, spec: PredictSpec, generator: torch.Generator | None = None,
            to_cpu: bool = True) -> Predictions:
    """logits [K, C, V] -> Predictions [K, C] (on the CPU unless to_cpu=False, e.g. inside a CUDA graph).

    Temperature 0: the argmax token. Otherwise a token sampled from softmax(logits / temperature), restricted
    to the top-p nucleus, drawn with the exponential-race trick (argmax of p / Exp(1) noise: no host sync).
    ``prob`` is the chosen token's probability under that (tempered, nucleus-renormalized) distribution, as
    Fast-dLLM and D2F use it; ``conf`` is the measure named by spec.measure on the same distribution.
    """
    # float32 (float64 stays float64): one copy when ids are suppressed in place (never the caller's tensor)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=len(spec.suppress_ids) > 0)
    for token in spec.suppress_ids:  # scalar indexing: no host-to-device index copy (CUDA-graph safe)
        logits[..., token] = float("-inf")
    if spec.temperature > 0:
        logits = logits / spec.temperature
    probs = torch.softmax(logits, dim=-1)  # [K, C, V]
    if spec.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > spec.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    if spec.temperature > 0:
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
        tokens = (probs / noise).argmax(-1)
    else:
        tokens = probs.argmax(-1)
    chosen = probs.gather(-1, tokens[..., None])[..., 0]
    conf = measure_confidence(probs, chosen, spec.measure)
    if not to_cpu:
        return Predictions(tokens, chosen, conf)
    return Predictions(tokens.cpu(), chosen.cpu(), conf.cpu())


def measure_confidence(probs: torch.Tensor, chosen: torch.Tensor, measure: str) -> torch.Tensor:
    """probs [..., V], chosen [...] (the chosen token's probability) -> the confidence named by ``measure``."""
    if measure == "prob":
        return chosen
    if measure == "neg_entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    raise ValueError(f"unknown confidence measure {measure!r}")


def mean_confidence(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 2: mean confidence over each branch's still-masked positions. conf/masked [K, C] -> [K].

    A branch with nothing left to fill scores +inf: it has finished its window, the best possible outcome.
    """
    count = masked.sum(-1)
    total = torch.where(masked, conf, torch.zeros_like(conf)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("inf")))


def lowest_confidence(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None,
                      fraction: float = 0.1) -> torch.Tensor:
    """DeepConf's weak-link variant: mean over the least confident 10% (at least one) of masked positions."""
    scores = []
    for row_conf, row_mask in zip(conf, masked):
        values = row_conf[row_mask]
        if values.numel() == 0:
            scores.append(float("inf"))
            continue
        n = max(1, int(values.numel() * fraction))
        scores.append(values.sort().values[:n].mean().item())
    return torch.tensor(scores)


def random_choice(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ablation, not a confidence: a uniformly random winner, i.e. a random token-filling order among the
    same k+1 candidates LoPA weighs (seeded by DecodeConfig.seed)."""
    return torch.rand(conf.shape[0], generator=generator)


# name -> (conf [K, C], still masked [K, C], generator) -> score [K]; the argmax row wins.
BRANCH_SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_confidence,
    "lowest": lowest_confidence,
    "random": random_choice,
}
