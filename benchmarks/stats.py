"""Summary statistics for benchmark timings: percentiles, millisecond views, rates and ratios.

Every latency the harness reports is a distribution over repeated runs (after warm-up), never one
number: p50 for the typical run, p90/p99 for the tail a user of an interactive service feels.

Percentiles use numpy's default ``method="linear"`` (Hyndman & Fan type 7, the same as Excel's
PERCENTILE.INC): sort the n samples, put the q-th percentile at fractional rank ``h = (n - 1) * q``
and interpolate linearly between the two samples around it. For the samples 1..100 that gives
p50 = 50.5, p90 = 90.1, p99 = 99.01. With one sample every percentile is that sample. With few runs
p99 is an interpolation between the two slowest runs, not an observed 1-in-100 event: the record
keeps ``n`` next to it so a reader can tell.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import numpy as np


class Percentiles(TypedDict):
    """A distribution summary; units are the caller's (seconds in records, ms for display)."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    n: int  # number of samples (timed runs, warm-up excluded)


PERCENTILE_KEYS = ("p50", "p90", "p99")


def percentiles(samples: Iterable[float]) -> Percentiles:
    """p50/p90/p99 (linear interpolation, see module doc), mean, min, max and n of ``samples``."""
    a = np.asarray(list(samples), dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D sequence of numbers, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"samples must be finite, got {a[~np.isfinite(a)][:3].tolist()}")
    p50, p90, p99 = np.percentile(a, [50, 90, 99], method="linear")
    return Percentiles(
        p50=float(p50), p90=float(p90), p99=float(p99),
        mean=float(a.mean()), min=float(a.min()), max=float(a.max()), n=int(a.size),
    )


def scale(p: Percentiles, factor: float) -> Percentiles:
    """The same summary in other units (every statistic times ``factor``; ``n`` unchanged)."""
    return Percentiles(**{k: (v if k == "n" else v * factor) for k, v in p.items()})  # type: ignore[typeddict-item]


def summarize_ms(seconds: Iterable[float]) -> Percentiles:
    """Percentiles of timings measured in seconds, reported in milliseconds (for display)."""
    return scale(percentiles(seconds), 1e3)


def rates(count: float, seconds: Iterable[float]) -> list[float]:
    """Per-run rates ``count / s``, e.g. tokens/s from each run's end-to-end time.

    Summarise these with :func:`percentiles` rather than inverting the time percentiles: the p50
    rate equals count / p50 time, but a rate's p90 is a *fast* run (the time's p10), so the slow
    tail of throughput sits at the low percentiles.
    """
    out = []
    for s in seconds:
        if not s > 0:
            raise ValueError(f"run times must be > 0 s, got {s}")
        out.append(count / s)
    return out


def ratio(numer: float | None, denom: float | None) -> float | None:
    """``numer / denom``, or None when either is missing or ``denom`` is 0 (a failed backend)."""
    if numer is None or denom is None or denom == 0:
        return None
    return numer / denom


def x_floor(measured_s: float | None, floor_s: float | None) -> float | None:
    """Measured time as a multiple of the physical floor (1.0 would be perfect; >= 1 expected)."""
    return ratio(measured_s, floor_s)
