"""Binomial bounds for the statistical tests. Every bound allows 5 standard deviations: a
two-sided false-alarm probability of 5.7e-7 per check, so a suite of a few hundred checks
fails spuriously less than once in ten thousand runs (and never, with the fixed seeds used)."""
import math

SIGMAS = 5.0


def assert_binomial(count: int, trials: int, prob: float, what: str = "count") -> None:
    mean = trials * prob
    sd = math.sqrt(trials * prob * (1.0 - prob))
    assert abs(count - mean) <= SIGMAS * max(sd, 1e-12) + 1e-9, (
        f"{what}: {count} of {trials}, expected {mean:.1f} +- {SIGMAS:g} x {sd:.2f}")
