"""Choosing negatives from search results: pure numpy over (queries x candidates) arrays.

Three steps, each a small function with no hidden state:

1. `candidate_window`: per query, drop its labelled positives from the ranking, then keep the
   ranks `rank_start .. rank_end - 1` of what is left.
2. `margin_threshold`: per (query, positive) row, the score above which a candidate is too
   close to the positive to trust as a negative (sign-safe relative margin).
3. `pick`: per row, `count` of the surviving candidates, the best ranked (`top`) or a seeded
   uniform sample (`random`) kept in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    """Per query, the candidate rows (-1 = none) and scores (-inf = none), best first."""

    indices: np.ndarray
    scores: np.ndarray
    positives_in_results: int
    short_queries: int


def candidate_window(indices: np.ndarray, scores: np.ndarray, positive_rows: list[np.ndarray], documents: int,
                     rank_start: int, rank_end: int) -> Window:
    """Cut each query's ranking (positives removed) to ranks `rank_start .. rank_end - 1`.

    `indices`/`scores` are (queries, k) search results; `positive_rows[q]` the corpus rows
    labelled relevant for query q. `short_queries` counts queries whose window has fewer
    than `rank_end - rank_start` candidates (a small corpus or an index that returned fewer).
    """
    queries, width = len(indices), rank_end - rank_start
    query_of = np.repeat(np.arange(queries, dtype=np.int64), [len(rows) for rows in positive_rows])
    positive_keys = query_of * documents + np.concatenate(positive_rows).astype(np.int64)
    result_keys = np.arange(queries, dtype=np.int64)[:, None] * documents + indices
    is_positive = (indices >= 0) & np.isin(result_keys, positive_keys)
    usable = (indices >= 0) & ~is_positive
    rank = np.cumsum(usable, axis=1) - 1
    in_window = usable & (rank >= rank_start) & (rank < rank_end)
    order = np.argsort(~in_window, axis=1, kind="stable")[:, :width]  # window members first, in rank order
    valid = np.take_along_axis(in_window, order, axis=1)
    window_indices = np.where(valid, np.take_along_axis(indices, order, axis=1), -1)
    window_scores = np.where(valid, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    if window_indices.shape[1] < width:  # fewer results than the window is wide: pad
        pad = width - window_indices.shape[1]
        window_indices = np.pad(window_indices, ((0, 0), (0, pad)), constant_values=-1)
        window_scores = np.pad(window_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    short = int(((window_indices >= 0).sum(axis=1) < width).sum())
    return Window(window_indices, window_scores, int(is_positive.sum()), short)


def margin_threshold(positive_scores: np.ndarray, margin: float) -> np.ndarray:
    """Score above which a candidate is dropped: pos - |pos| x (1 - margin); +inf when margin is 0 (off).

    Equals margin x pos for the usual positive scores, and stays below pos when pos < 0
    (a plain product would raise the threshold above a negative positive score).
    """
    if margin == 0:
        return np.full(positive_scores.shape, np.inf, dtype=np.float32)
    return (positive_scores - np.abs(positive_scores) * (1.0 - margin)).astype(np.float32)


def pick(keep: np.ndarray, count: int, sampling: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `count` kept candidates per row, in rank order, and which rows had enough.

    `keep` is (rows, window) booleans in rank order. `top` takes the first `count` kept
    candidates; `random` a uniform sample of them (one draw of `rng` per cell, so the result
    depends only on the seed and the row order). Rows with fewer than `count` kept
    candidates are marked False; their positions are meaningless.
    """
    if sampling == "top":
        order = np.argsort(~keep, axis=1, kind="stable")[:, :count]
    elif sampling == "random":
        keys = rng.random(keep.shape)
        keys[~keep] = np.inf
        order = np.sort(np.argsort(keys, axis=1, kind="stable")[:, :count], axis=1)
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    return order, keep.sum(axis=1) >= count
