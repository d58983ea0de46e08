"""Whether a difference between two rows, paired by seed, is measured or inside the seeds' noise.

The benchmarks compare methods on three seeds, where one seed's spread is often larger than the difference between
two methods' means. A mean paired difference within two standard errors of zero is called noise: the pages then say
the two rows are level on those seeds rather than that one is ahead.
"""

from __future__ import annotations

import math
import statistics


def standard_error(differences: list[float]) -> float:
    """The standard error of the mean of ``differences`` (at least two)."""
    return statistics.stdev(differences) / math.sqrt(len(differences))


def inside_noise(differences: list[float]) -> bool:
    """The mean paired difference within two standard errors of zero; never with fewer than two seeds."""
    return len(differences) >= 2 and abs(statistics.fmean(differences)) <= 2 * standard_error(differences)


def noise_text(differences: list[float]) -> str:
    """``mean -0.1 ± 1.0 standard error: inside the seeds' noise`` (or ``beyond``); one seed gives no estimate."""
    if len(differences) < 2:
        return "one seed: no noise estimate"
    verdict = "inside the seeds' noise" if inside_noise(differences) else "beyond the seeds' noise"
    return f"mean {statistics.fmean(differences):+.1f} ± {standard_error(differences):.1f} standard error: {verdict}"
