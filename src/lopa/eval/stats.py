"""A confidence interval for the accuracy difference of two runs on the same problems (paired binary outcomes).

Each problem is a pair (right with A?, right with B?). Only the discordant pairs move the difference:
`gain` problems are right only with B, `loss` problems only with A, and d = (gain - loss) / n.

The interval is Tango's score interval (T. Tango, Stat Med 17:891-908, 1998): every d whose score statistic,
with the other cell probabilities at their maximum-likelihood values under that d, stays within ±z. Unlike the
normal (Wald) interval on the per-problem differences it is valid at small n: its limits are searched inside
[-1, 1], so they never leave it, and it keeps a positive width when no pair is discordant (0 of n pairs
differing is still compatible with a difference of up to ±z² / (n + z²)).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
_STEPS = 100  # bisection halvings: far below float resolution on [-1, 1]


def tango_score(d: float, gain: int, loss: int, n: int) -> float:
    """Tango's score statistic at difference d: (gain - loss - n d) / its standard error under d, where the
    probability of a loss (right only with A) is its restricted MLE, the root of A p² + B p + C = 0."""
    a = 2 * n
    b = -gain - loss + (2 * n - gain + loss) * d
    c = -loss * d * (1 - d)
    p_loss = (math.sqrt(max(0.0, b * b - 4 * a * c)) - b) / (2 * a)
    var = n * (2 * p_loss + d * (1 - d))
    num = gain - loss - n * d
    if var <= 0:  # only at d = ±1 or where no pair is discordant and d = 0
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def paired_interval(gain: int, loss: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(lower, upper) of the score interval for (gain - loss) / n; z = Z95 gives 95%. Needs n >= 1."""
    if n < 1 or gain < 0 or loss < 0 or gain + loss > n:
        raise ValueError(f"paired_interval: need 0 <= gain, loss and gain + loss <= n >= 1, got {gain}, {loss}, {n}")
    d_hat = (gain - loss) / n
    # The statistic falls from +inf (d -> -1) through 0 (at d_hat) to -inf (d -> 1): each limit is a crossing.
    lower = _crossing(-1.0, d_hat, lambda d: tango_score(d, gain, loss, n) > z)
    upper = _crossing(1.0, d_hat, lambda d: tango_score(d, gain, loss, n) < -z)
    return lower, upper


def _crossing(outside: float, inside: float, is_outside) -> float:
    """Bisection between a d outside the interval and one inside (d_hat); the last d found inside."""
    for _ in range(_STEPS):
        mid = (outside + inside) / 2
        if mid in (outside, inside):  # converged, or d_hat is itself the edge (±1)
            break
        if is_outside(mid):
            outside = mid
        else:
            inside = mid
    return inside
