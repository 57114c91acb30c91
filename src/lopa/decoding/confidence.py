"""From logits to per-position predictions and confidences, and the branch-confidence functions (Eq. 2).

Everything here is vectorized and stays on the logits' device until the final (small) copy to the CPU.
"""

from __future__ import annotations

import functools
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


def count_above(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None,
                tau: float = 0.9) -> torch.Tensor:
    """The next fill, predicted: how many positions this branch fills if it wins. Row 0 is the anchor.

    Positions the row fills beyond the anchor (its lookahead: masked in row 0, filled here) plus its still-masked
    positions whose confidence passes τ (with measure "prob", exactly Eq. 1's fill set, fallback aside). Ties
    (integers) are broken by the mean confidence, scaled to stay under one position.
    """
    ahead = masked[0].sum() - masked.sum(-1)  # [K] 0 for the anchor, 1 for a lookahead
    passing = (masked & (conf > tau)).sum(-1)  # [K]
    tiebreak = 0.5 * mean_confidence(conf, masked).clamp(max=1.0)
    return (ahead + passing).to(conf.dtype) + tiebreak


def top_m_confidence(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None,
                     m: int = 8) -> torch.Tensor:
    """Mean over the m most confident still-masked positions (the ones the next iterations fill first)."""
    if conf.shape[-1] == 0:
        return torch.full((conf.shape[0],), float("inf"))
    values = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    top = values.topk(min(m, conf.shape[-1]), dim=-1).values  # [K, m]
    return mean_confidence(top, top > float("-inf"))


def weakest_segment(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None,
                    m: int = 8) -> torch.Tensor:
    """DeepConf's sliding-window weak link: over every run of m consecutive requested columns, the mean
    confidence of its still-masked positions; the branch scores its weakest such segment."""
    K, C = conf.shape
    if C == 0:
        return torch.full((K,), float("inf"))
    zero = torch.zeros(K, 1, dtype=conf.dtype)
    total = torch.cat([zero, torch.where(masked, conf, torch.zeros_like(conf)).cumsum(-1)], -1)  # [K, C+1]
    count = torch.cat([zero, masked.to(conf.dtype).cumsum(-1)], -1)
    w = min(m, C)
    seg_total, seg_count = total[:, w:] - total[:, :-w], count[:, w:] - count[:, :-w]  # [K, C-w+1]
    seg_mean = torch.where(seg_count > 0, seg_total / seg_count.clamp(min=1), torch.full_like(seg_total, float("inf")))
    return seg_mean.min(-1).values


def log_confidence_sum(conf: torch.Tensor, masked: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of log-confidences over the still-masked positions: the log of the joint probability that every
    remaining prediction stands (measure "prob" or "margin"). Favours branches with fewer positions left."""
    logs = torch.where(masked, torch.log(conf.clamp(min=1e-10)), torch.zeros_like(conf))
    return torch.where(masked.any(-1), logs.sum(-1), torch.full((conf.shape[0],), float("inf"), dtype=conf.dtype))


# name -> (conf [K, C], still masked [K, C], generator, **params) -> score [K]; the argmax row wins; row 0 is
# the anchor. A finished branch (nothing left to fill) scores +inf.
BRANCH_SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_confidence,
    "lowest": lowest_confidence,
    "random": random_choice,
    "count": count_above,
    "top_m": top_m_confidence,
    "segment": weakest_segment,
    "logsum": log_confidence_sum,
}

# The DecodeConfig fields a score reads, by name.
SCORE_PARAMS: dict[str, Callable[..., dict]] = {
    "count": lambda cfg: {"tau": cfg.tau},
    "top_m": lambda cfg: {"m": cfg.branch_m},
    "segment": lambda cfg: {"m": cfg.branch_m},
}

# Scores that read confidences as probabilities in [0, 1], and the measures that give them.
SCORE_MEASURES: dict[str, tuple[str, ...]] = {"count": ("prob",), "logsum": ("prob", "margin")}


def branch_score(cfg) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]:
    """cfg.branch_confidence with its parameters bound: (conf [K, C], masked [K, C], generator) -> [K]."""
    params = SCORE_PARAMS.get(cfg.branch_confidence, lambda _: {})(cfg)
    return functools.partial(BRANCH_SCORES[cfg.branch_confidence], **params)
