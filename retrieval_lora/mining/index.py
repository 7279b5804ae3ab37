"""FAISS inner-product search over normalized embeddings: exact, IVF, HNSW or IVF-PQ.

Exact search costs queries x documents x dim multiply-adds: on a CPU that is seconds for
hundreds of thousands of documents, far below the cost of encoding them, so `auto` stays exact
up to `approximate_above` documents, uses HNSW above it, and IVF-PQ above `compress_above`,
where a flat or graph index (4 bytes per dimension per document) no longer fits in memory.

Vectors may be an in-memory array or a memory-mapped one (`np.load(..., mmap_mode="r")`, e.g.
an embedding-cache entry written in shards): every pass over them goes `INDEX_CHUNK` rows at a
time, converted to float32 per chunk, so the corpus matrix never has to be resident. Exact
search streams the chunks through `faiss.knn` and keeps a running top-k (no flat index is
built). IVF-PQ keeps only `pq_bytes` per document (plus its 8-byte id): it is trained on a
seeded sample of `train_sample` vectors, filled chunk by chunk, and each query's `refine x k`
best compressed candidates are rescored exactly from the stored vectors, so the scores it
returns are exact inner products (mining's margin guard compares them with exact positive
scores) and the rescoring wins back most of the recall the compression costs. The parameters
behind the defaults were measured on 1M vectors (evals/results/ivfpq_1m.md).

An approximate index reports its recall against exact search on a seeded sample of queries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from retrieval_lora.errors import MiningError
from retrieval_lora.mining.config import MiningConfig

HNSW_NEIGHBOURS = 32  # graph degree M; FAISS's own examples use 16-64
HNSW_EF_CONSTRUCTION = 80
INDEX_CHUNK = 65_536  # rows per pass over the corpus: a float32 chunk of 384-d vectors is 96 MB
RESCORE_VALUES = 1 << 23  # candidate vector values gathered per rescoring block (32 MB of float32)
ID_BYTES = 8  # an IVF list stores a 64-bit id beside each code


@dataclass
class SearchResult:
    """Top-k document rows and scores per query (row -1 / score -inf where fewer than k exist)."""

    indices: np.ndarray
    scores: np.ndarray
    info: dict = field(default_factory=dict)


def choose_index(kind: str, documents: int, approximate_above: int,
                 compress_above: int | None = None) -> tuple[str, str]:
    """(index kind, why): resolves 'auto' by corpus size (exact, then HNSW, then IVF-PQ)."""
    if kind != "auto":
        return kind, "asked for"
    if compress_above is not None and documents > compress_above:
        return "ivfpq", f"auto: {documents} documents > compress_above={compress_above}"
    if documents > approximate_above:
        return "hnsw", f"auto: {documents} documents > approximate_above={approximate_above}"
    return "exact", f"auto: {documents} documents <= approximate_above={approximate_above}"


def _chunks(vectors: np.ndarray, chunk: int = INDEX_CHUNK):
    """(start, float32 C-contiguous block) over the rows of `vectors`, `chunk` rows at a time."""
    for start in range(0, len(vectors), chunk):
        yield start, np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def default_nlist(documents: int, trained_on: int | None = None) -> int:
    """~4 sqrt(n) lists, with at least 39 of the `trained_on` training points per list as FAISS recommends."""
    return max(1, min(int(4 * math.sqrt(documents)), (trained_on or documents) // 39))


def _training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of rows (read in row order, which a memory-mapped file reads fastest)."""
    if size >= len(vectors):
        return _float32(vectors[:])
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return _float32(vectors[rows])


def _check_pq(dim: int, pq_bytes: int) -> None:
    if dim % pq_bytes:
        divisors = [m for m in (8, 16, 24, 32, 48, 64, 96, 128) if dim % m == 0]
        raise MiningError(f"pq_bytes={pq_bytes} does not divide the embedding dimension {dim}: each code byte "
                          f"quantizes dim / pq_bytes dimensions; use one of {divisors}")


def build_index(kind: str, vectors: np.ndarray, config: MiningConfig, k: int) -> tuple[faiss.Index | None, dict]:
    """A filled FAISS inner-product index of `kind` ('ivf', 'hnsw' or 'ivfpq') and its parameters;
    for 'exact' no index (exact search streams over the vectors) and no parameters."""
    dim = vectors.shape[1]
    if kind == "exact":
        return None, {}
    if kind in ("ivf", "ivfpq"):
        # IVF-Flat keeps every vector anyway: it trains on all of them, as before
        sample = min(len(vectors), len(vectors) if kind == "ivf" else config.train_sample)
        nlist = config.nlist or default_nlist(len(vectors), sample)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            _check_pq(dim, config.pq_bytes)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, sample, config.seed))
        index.nprobe = min(config.nprobe, nlist)
        params = {"nlist": nlist, "nprobe": index.nprobe}
        if kind == "ivfpq":
            params.update(pq_bytes=config.pq_bytes, train_sample=sample, refine=config.refine,
                          bytes_per_document=config.pq_bytes + ID_BYTES)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(config.ef_search, k)  # HNSW cannot return more than efSearch results
        params = {"M": HNSW_NEIGHBOURS, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": index.hnsw.efSearch}
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    for _, block in _chunks(vectors):
        index.add(block)
    return index, params


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product search, streamed over `INDEX_CHUNK` rows of `vectors` at a time.

    Memory: one float32 chunk plus queries x k results, whatever the corpus size. The same
    results as a flat index (`faiss.IndexFlatIP`), which runs the same kernel per chunk.
    """
    queries = _float32(queries)
    k = min(k, len(vectors))
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in _chunks(vectors):
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + start, -1))
    heap.finalize()
    indices, scores = heap.I.astype(np.int64), heap.D.astype(np.float32)
    scores[indices < 0] = -np.inf
    return indices, scores


def rescore(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of each query's `candidates` (rows, -1 = none) by exact inner product with the
    stored vectors; ties by row. Reads only the candidate rows, a block of queries at a time."""
    queries = _float32(queries)
    out_rows = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    step = max(1, RESCORE_VALUES // max(1, candidates.shape[1] * queries.shape[1]))
    for start in range(0, len(queries), step):
        block = candidates[start:start + step]
        valid = block >= 0
        unique, position = np.unique(np.where(valid, block, 0), return_inverse=True)
        gathered = _float32(vectors[unique])[position.reshape(block.shape)]
        scores = np.einsum("qd,qcd->qc", queries[start:start + step], gathered)
        scores[~valid] = -np.inf
        order = np.lexsort((np.where(valid, block, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
        out_rows[start:start + len(block), :order.shape[1]] = np.where(
            np.take_along_axis(valid, order, axis=1), np.take_along_axis(block, order, axis=1), -1)
        out_scores[start:start + len(block), :order.shape[1]] = np.take_along_axis(scores, order, axis=1)
    return out_rows, out_scores


def search_index(index: faiss.Index | None, kind: str, vectors: np.ndarray, queries: np.ndarray, k: int,
                 config: MiningConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the top `k` per query from an index `build_index` made (None: exact search);
    IVF-PQ's `k x refine` compressed candidates are rescored exactly from `vectors`."""
    if index is None:
        return exact_search(vectors, queries, k)
    if kind == "ivfpq":
        depth = min(len(vectors), k * config.refine)
        _, candidates = index.search(_float32(queries), depth)
        return rescore(vectors, queries, candidates, k)
    scores, indices = index.search(_float32(queries), k)
    scores[indices < 0] = -np.inf
    return indices, scores


def recall_against_exact(found: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int, sample: int,
                         seed: int) -> dict:
    """Mean share of the exact top-k that `found` (the approximate top-k rows of every query) also
    holds, on a seeded sample of `sample` queries; exact search streams over the vectors."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(queries), size=min(sample, len(queries)), replace=False))
    truth, _ = exact_search(vectors, queries[chosen], k)
    overlaps = [len(set(t[t >= 0]) & set(f[f >= 0])) / max(1, int((t >= 0).sum()))
                for t, f in zip(truth, found[chosen])]
    return {"recall_at_k": float(np.mean(overlaps)), "k": k, "queries": int(len(chosen))}


def index_bytes(index: faiss.Index | None) -> int:
    """The in-memory size of a built index (0 for exact search, which builds none)."""
    return 0 if index is None else int(faiss.serialize_index(index).nbytes)


def search_corpus(vectors: np.ndarray, queries: np.ndarray, k: int, config: MiningConfig) -> SearchResult:
    """Top-`k` search of `queries` over `vectors` with the index `config` chooses (`index`,
    `approximate_above`, `compress_above`, and the kind's own settings); timings and, for an
    approximate index, recall against exact search on `config.recall_queries` queries in `info`.

    Raises:
        MiningError: IVF-PQ with `pq_bytes` that does not divide the embedding dimension.
    """
    resolved, why = choose_index(config.index, len(vectors), config.approximate_above, config.compress_above)
    started = time.perf_counter()
    index, params = build_index(resolved, vectors, config, k)
    built = time.perf_counter()
    indices, scores = search_index(index, resolved, vectors, queries, k, config)
    info = {"kind": resolved, "reason": why, "params": params, "documents": int(len(vectors)), "k": k,
            "build_seconds": round(built - started, 3), "search_seconds": round(time.perf_counter() - built, 3)}
    if resolved != "exact":
        info["recall"] = recall_against_exact(indices, vectors, queries, k, config.recall_queries, config.seed)
    return SearchResult(indices, scores, info)
