"""Choosing negatives from search results: pure numpy over (queries x candidates) arrays.

Three steps, each a small function with no hidden state:

1. `candidate_window`: per query, drop its labelled positives from the ranking, then keep the
   ranks `rank_start .. rank_end - 1` of what is left.
2. `margin_threshold`: per (query, positive) row, the score above which a candidate is too
   close to the positive to trust as a negative (sign-safe relative margin).
3. `pick`: per row, `count` of the surviving candidates, the best ranked (`top`) or a seeded
   uniform sample (`random`) kept in rank order.

And, for rows left short (`short_rows="fill"`): `guarded_best` takes the best-ranked
candidates of a second window (the ranks past the first) that pass the same margin, and
`complete` appends them after the row's own survivors.
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


FILL_CHUNK = 4096  # rows per chunk in `guarded_best`: bounds the (rows x window) temporaries


def guarded_best(window: Window, row_query: np.ndarray, thresholds: np.ndarray,
                 count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the `count` best-ranked candidates of its query's `window` scoring at or below its threshold.

    `row_query[r]` is row r's query (a row of `window`), `thresholds[r]` its margin threshold
    (`margin_threshold`). Returns (rows, count) corpus rows (-1 = none), scores (-inf = none)
    and which cells hold a candidate; found candidates come first, in rank order.
    """
    rows = len(row_query)
    indices = np.full((rows, count), -1, dtype=np.int64)
    scores = np.full((rows, count), -np.inf, dtype=np.float32)
    for start in range(0, rows, FILL_CHUNK):
        queries, limits = row_query[start:start + FILL_CHUNK], thresholds[start:start + FILL_CHUNK, None]
        candidates, candidate_scores = window.indices[queries], window.scores[queries]
        keep = (candidates >= 0) & (candidate_scores <= limits)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :count]
        found = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]  # below `count` when the window is narrower
        indices[start:start + len(queries), :width] = np.where(found, np.take_along_axis(candidates, order, axis=1), -1)
        scores[start:start + len(queries), :width] = np.where(found, np.take_along_axis(candidate_scores, order, axis=1),
                                                              -np.inf)
    return indices, scores, indices >= 0


def complete(own: np.ndarray, have: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Per row, its first `have[r]` cells of `own` followed by the first cells of `extra`.

    `own` and `extra` are (rows, count); the result is (rows, count), so every row keeps the
    same number of columns whatever it took from where.
    """
    count = own.shape[1]
    column = np.arange(count)[None, :]
    source = np.where(column < have[:, None], column, count + column - have[:, None])
    return np.take_along_axis(np.concatenate([own, extra], axis=1), source, axis=1)
