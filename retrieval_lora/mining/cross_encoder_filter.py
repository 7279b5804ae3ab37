"""Optional false-negative guard: a cross-encoder rescoring the candidates that passed the margin.

A candidate is dropped for a row when the cross-encoder scores it above the same sign-safe
relative margin of that row's positive, also scored by the cross-encoder. Only candidates
still kept by some row of their query are scored, each (query, candidate) pair once.
"""

from __future__ import annotations

import numpy as np
from sentence_transformers import CrossEncoder

from retrieval_lora.mining.selection import margin_threshold
from retrieval_lora.models.prior import cached_views


def cross_encoder_drops(model: CrossEncoder, query_texts: list[str], doc_texts: list[str], window: np.ndarray,
                        row_query: np.ndarray, row_positive: np.ndarray, keep: np.ndarray, margin: float,
                        batch_size: int, show_progress: bool) -> np.ndarray:
    """(rows, window) booleans: kept candidates the cross-encoder rates too close to the row's positive.

    `window` is (queries, width) candidate corpus rows; `row_query`/`row_positive` give each
    row's query index and positive corpus row; `keep` the candidates kept so far per row.
    """
    needed = np.zeros(window.shape, dtype=bool)
    np.logical_or.at(needed, row_query, keep)
    query_at, slot_at = np.nonzero(needed)
    pairs = [(query_texts[q], doc_texts[window[q, s]]) for q, s in zip(query_at, slot_at)]
    pairs += [(query_texts[q], doc_texts[p]) for q, p in zip(row_query, row_positive)]
    with cached_views(model):  # a cosine-prior reranker encodes each query and document view once
        scores = np.asarray(model.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress,
                                          convert_to_numpy=True), dtype=np.float32).reshape(-1)
    candidate_scores = np.full(window.shape, -np.inf, dtype=np.float32)
    candidate_scores[query_at, slot_at] = scores[: len(query_at)]
    positive_scores = scores[len(query_at):]
    return keep & (candidate_scores[row_query] > margin_threshold(positive_scores, margin)[:, None])
