"""The paired accuracy interval (lopa.eval.stats): Tango's score interval for the difference of paired proportions."""

import math

import pytest

from lopa.eval.stats import paired_interval


def score_by_likelihood(d: float, gain: int, loss: int, n: int) -> float:
    """The score statistic at d computed independently of lopa's closed form: the loss probability that
    maximizes the multinomial likelihood under d is found by golden-section search, and the variance is
    written as that of one pair's difference, p_gain + p_loss - d²."""
    lo, hi = max(0.0, -d), (1.0 - d) / 2

    def loglik(p_loss: float) -> float:
        total = 0.0
        for count, p in ((gain, p_loss + d), (loss, p_loss), (n - gain - loss, 1.0 - 2 * p_loss - d)):
            if count:
                if p <= 0:
                    return -math.inf
                total += count * math.log(p)
        return total

    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if loglik(a) >= loglik(b):
            hi = b
        else:
            lo = a
    p_loss = (lo + hi) / 2
    var = (p_loss + d) + p_loss - d * d
    return (gain - loss - n * d) / math.sqrt(n * var)


def interval_by_grid(gain: int, loss: int, n: int, step: float = 1e-3) -> tuple[float, float]:
    """Every grid point d in (-1, 1) whose statistic stays within ±1.96: its smallest and largest."""
    inside = [d for d in (-1 + step * i for i in range(1, round(2 / step)))
              if abs(score_by_likelihood(d, gain, loss, n)) <= 1.959963984540054]
    return min(inside), max(inside)


def test_published_reference_values():
    """Fagerland, Lydersen & Laake's `contingencytables` (R) test suite: Cavo et al. 2012 (n12 = 6, n21 = 16 of
    161 pairs) gives -0.0621 (95% CI -0.1240 to -0.0054); 3 of 3 pairs discordant one way gives -0.1230 to 1."""
    lower, upper = paired_interval(6, 16, 161)
    assert (round(lower, 4), round(upper, 4)) == (-0.1240, -0.0054)
    assert tuple(round(x, 4) for x in paired_interval(3, 0, 3)) == (-0.1230, 1.0)
    assert tuple(round(x, 4) for x in paired_interval(0, 3, 3)) == (-1.0, 0.1230)


@pytest.mark.parametrize("gain,loss,n", [(0, 0, 1), (1, 0, 1), (0, 0, 2), (1, 1, 2), (2, 0, 5), (1, 3, 5),
                                         (0, 0, 20), (7, 2, 20), (0, 0, 1000), (105, 25, 1000)])
def test_agrees_with_an_independent_likelihood_computation(gain, loss, n):
    want = interval_by_grid(gain, loss, n)
    got = paired_interval(gain, loss, n)
    assert all(abs(g - w) <= 1e-3 + 1e-9 for g, w in zip(got, want)), (got, want)  # the grid's resolution


def tables(n: int):
    if n <= 20:
        return [(g, lo) for g in range(n + 1) for lo in range(n + 1 - g)]
    return [(0, 0), (1, 0), (0, 1), (500, 500), (1000, 0), (0, 1000), (105, 25), (3, 990)]


@pytest.mark.parametrize("n", [1, 2, 5, 20, 1000])
def test_limits_stay_in_range_hold_the_estimate_and_have_width(n):
    for gain, loss in tables(n):
        lower, upper = paired_interval(gain, loss, n)
        d = (gain - loss) / n
        assert -1.0 <= lower <= d <= upper <= 1.0, (gain, loss, n, lower, upper)
        assert upper - lower > 0, (gain, loss, n)
    lower, upper = paired_interval(0, 0, n)  # no discordant pair: symmetric, positive width, narrowing with n
    z2 = 1.959963984540054 ** 2
    assert lower == pytest.approx(-upper) and upper == pytest.approx(z2 / (n + z2))


def test_bad_counts_are_refused():
    for args in [(0, 0, 0), (-1, 0, 3), (2, 2, 3)]:
        with pytest.raises(ValueError):
            paired_interval(*args)
