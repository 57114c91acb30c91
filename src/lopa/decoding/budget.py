"""How many lookahead branches one LoPA iteration spawns (DecodeConfig.k_policy), at most k.

A branch costs a window's worth of rows in the forward: K = k_t + 1 rows of W columns. The paper fixes k per
task. Here a policy may spend fewer, from what the strategy sees on the host before the forward:

    fixed  k every iteration (the paper).
    text   from the confidence landscape: the positions the last iteration filled (many filled: the text is
           easy here and the anchor alone fills a lot) and how far apart the candidates' confidences are
           (all alike: the branches are near-copies of one another). See ``text_budget``.
    load   from the load: the engine sets ``DecodeState.row_budget``, the rows this request may use in its
           next forward (Engine.row_budget: RunnerConfig.step_rows split evenly among the requests of the
           step); the policy takes as many branches as fit, at least one lookahead, at most k. An engine
           without step_rows refuses a lopa request with this policy at admission (lopa/request.py).

Pure host code on small CPU tensors: deterministic, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# text policy: the budget halves for every FILL_HALVING positions the last iteration filled, and drops to
# its floor when the candidates' confidences span less than FLAT_SPREAD (nothing to choose between)
FILL_HALVING = 4.0
FLAT_SPREAD = 0.02
K_FLOOR = 1


@dataclass(frozen=True)
class Landscape:
    """What a budget policy may read before the forward."""

    cand_conf: torch.Tensor  # [n] confidences of the lookahead candidates, most confident first
    last_fill: int  # positions the previous iteration filled (winner's lookahead + fill rule)
    width: int  # window columns W this forward will have
    row_budget: int | None = None  # rows (K * W) the engine allows this request's next forward; None = no limit


def fixed_budget(k: int, land: Landscape) -> int:
    return min(k, len(land.cand_conf))


def text_budget(k: int, land: Landscape) -> int:
    """k / 2^(last_fill / FILL_HALVING), at least K_FLOOR; K_FLOOR when the top candidates barely differ."""
    n = min(k, len(land.cand_conf))
    if n <= K_FLOOR:
        return n
    spread = float(land.cand_conf[0] - land.cand_conf[n - 1])
    if spread < FLAT_SPREAD:
        return K_FLOOR
    return max(K_FLOOR, min(n, round(k * 2.0 ** (-land.last_fill / FILL_HALVING))))


def load_budget(k: int, land: Landscape) -> int:
    """As many lookaheads as the engine's row budget holds (K * W <= row_budget), at least one, at most k."""
    n = min(k, len(land.cand_conf))
    if land.row_budget is None:
        return n
    return max(min(1, n), min(n, land.row_budget // max(1, land.width) - 1))


BUDGETS = {"fixed": fixed_budget, "text": text_budget, "load": load_budget}
