"""Log-scale duration histogram bins, shared by TTFB and total latency.

Why fixed log bins: LLM latencies span five orders of magnitude (a cached 5 ms answer, a 5 minute reasoning
stream), and what hedging needs is a relative precision (p95 ± 20 %), which equal-ratio bins give everywhere
for a fixed number of counters: no samples kept, no allocation per record, bins of any windows just add up.
"""

from __future__ import annotations

import math
from bisect import bisect_left

HIST_MIN_S = 0.001  # below 1 ms is loopback noise, not an LLM: one underflow bin
HIST_MAX_S = 900.0  # the default whole-attempt timeout (Timeouts.total_s): longer lands in the overflow bin
LOG_BINS = 72  # ln(900 / 0.001) / 72 ≈ 0.19, so one bin is ≈ 21 % wide: quantiles are good to a bin
BINS = LOG_BINS + 2  # + underflow [0, 1 ms) + overflow [900 s, ∞)
_LOG_RATIO = math.log(HIST_MAX_S / HIST_MIN_S) / LOG_BINS
BIN_RATIO = math.exp(_LOG_RATIO)
_INV_LOG_RATIO = 1.0 / _LOG_RATIO
_LOG_MIN = math.log(HIST_MIN_S)
# EDGES[j] = lower edge of bin j + 1; bin i in 1..LOG_BINS spans [EDGES[i - 1], EDGES[i]).
EDGES = tuple(HIST_MIN_S * math.exp(j * _LOG_RATIO) for j in range(LOG_BINS + 1))


def bin_of(seconds: float) -> int:
    """Histogram bin of a duration."""
    if seconds < HIST_MIN_S:
        return 0
    if seconds >= HIST_MAX_S:
        return BINS - 1
    # Rounding just below HIST_MAX_S may give BINS - 1 (overflow) instead of LOG_BINS: harmless, and
    # cheaper than a min() on every record.
    return int((math.log(seconds) - _LOG_MIN) * _INV_LOG_RATIO) + 1


def value_at(cum: list[int], rank: float) -> float:
    """The duration at `rank` (1-based, fractional) of a cumulative histogram, interpolated inside its bin."""
    i = bisect_left(cum, rank)
    before = cum[i - 1] if i else 0
    frac = (rank - before) / (cum[i] - before)
    if i == 0:
        return HIST_MIN_S * frac
    if i == BINS - 1:
        return HIST_MAX_S  # a lower bound: the overflow bin has no upper edge
    return EDGES[i - 1] * math.exp(frac * _LOG_RATIO)  # log-uniform inside the bin, like the bins themselves
