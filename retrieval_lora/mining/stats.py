"""Summaries of score distributions for the mining stats file."""

from __future__ import annotations

import numpy as np

QUANTILES = {"p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95}


def describe(values: np.ndarray) -> dict[str, float | int]:
    """Count, mean, std, min, quantiles and max of `values` (just the count when empty)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {"count": 0}
    summary: dict[str, float | int] = {"count": int(values.size), "mean": float(values.mean()),
                                       "std": float(values.std()), "min": float(values.min())}
    summary.update({name: float(np.percentile(values, q)) for name, q in QUANTILES.items()})
    summary["max"] = float(values.max())
    return {key: round(value, 5) if isinstance(value, float) else value for key, value in summary.items()}


def score_distributions(positive: np.ndarray, negative: np.ndarray) -> dict[str, dict]:
    """Positive scores (one per row), negative scores (rows x negatives) and their differences."""
    return {"positive": describe(positive), "negative": describe(negative),
            "difference": describe(positive[:, None] - negative if negative.size else negative)}
