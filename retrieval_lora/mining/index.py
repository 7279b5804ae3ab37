"""FAISS inner-product search over normalized embeddings: exact, IVF or HNSW.

Exact search (a flat index) costs queries x documents x dim multiply-adds: on a CPU that is
seconds for hundreds of thousands of documents, far below the cost of encoding them, so
`auto` stays exact up to a large size and switches to HNSW above it. An approximate index
reports its recall against exact search on a seeded sample of queries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

HNSW_NEIGHBOURS = 32  # graph degree M; FAISS's own examples use 16-64
HNSW_EF_CONSTRUCTION = 80


@dataclass
class SearchResult:
    """Top-k document rows and scores per query (row -1 / score -inf where fewer than k exist)."""

    indices: np.ndarray
    scores: np.ndarray
    info: dict = field(default_factory=dict)


def choose_index(kind: str, documents: int, approximate_above: int) -> tuple[str, str]:
    """(index kind, why): resolves 'auto' by corpus size."""
    if kind != "auto":
        return kind, "asked for"
    if documents > approximate_above:
        return "hnsw", f"auto: {documents} documents > approximate_above={approximate_above}"
    return "exact", f"auto: {documents} documents <= approximate_above={approximate_above}"


def build_index(kind: str, vectors: np.ndarray, *, nprobe: int, ef_search: int, k: int) -> tuple[faiss.Index, dict]:
    """A filled FAISS inner-product index of `kind` ('exact', 'ivf' or 'hnsw') and its parameters."""
    dim = vectors.shape[1]
    if kind == "exact":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "ivf":
        # ~4 sqrt(n) lists, with at least 39 training points per list as FAISS recommends.
        nlist = max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": index.nprobe}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(ef_search, k)  # HNSW cannot return more than efSearch results
        params = {"M": HNSW_NEIGHBOURS, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": index.hnsw.efSearch}
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(vectors)
    return index, params


def _search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, indices = index.search(queries, k)
    scores[indices < 0] = -np.inf
    return indices, scores


def recall_against_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, sample: int,
                         seed: int) -> dict:
    """Mean share of the exact top-k that `index` also returns, on a seeded sample of queries."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(queries), size=min(sample, len(queries)), replace=False))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    truth, _ = _search(exact, queries[chosen], k)
    found, _ = _search(index, queries[chosen], k)
    overlaps = [len(set(t[t >= 0]) & set(f[f >= 0])) / max(1, int((t >= 0).sum())) for t, f in zip(truth, found)]
    return {"recall_at_k": float(np.mean(overlaps)), "k": k, "queries": int(len(chosen))}


def search_corpus(vectors: np.ndarray, queries: np.ndarray, k: int, *, kind: str, approximate_above: int,
                  nprobe: int, ef_search: int, recall_queries: int, seed: int) -> SearchResult:
    """Top-`k` search of `queries` over `vectors` with the chosen index; timings and recall in `info`."""
    resolved, why = choose_index(kind, len(vectors), approximate_above)
    started = time.perf_counter()
    index, params = build_index(resolved, vectors, nprobe=nprobe, ef_search=ef_search, k=k)
    built = time.perf_counter()
    indices, scores = _search(index, queries, k)
    info = {"kind": resolved, "reason": why, "params": params, "documents": int(len(vectors)), "k": k,
            "build_seconds": round(built - started, 3), "search_seconds": round(time.perf_counter() - built, 3)}
    if resolved != "exact":
        info["recall"] = recall_against_exact(index, vectors, queries, k, recall_queries, seed)
    return SearchResult(indices, scores, info)
