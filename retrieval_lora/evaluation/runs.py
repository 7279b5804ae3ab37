"""Building runs: FAISS retrieval with an embedder, reranking with a cross-encoder, id checks.

A run is plain data: query id -> {document id -> score}, the same shape as qrels. Retrieval
uses exact inner-product search in FAISS over normalized embeddings (cosine similarity).
"""

from __future__ import annotations

import faiss
import numpy as np
from sentence_transformers import CrossEncoder, SentenceTransformer

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached
from retrieval_lora.encoding import encode_corpus, encode_texts
from retrieval_lora.errors import EvaluationError
from retrieval_lora.models.prior import cached_views

Run = dict[str, dict[str, float]]


def search(doc_ids: list[str], doc_embeddings: np.ndarray, query_ids: list[str], query_embeddings: np.ndarray,
           k: int, *, exclude_self: bool = False) -> Run:
    """Exact top-k inner-product search: the k best documents per query with their scores.

    With `exclude_self`, a document whose id equals the query's id is skipped (one extra
    candidate is fetched so that k documents remain).
    """
    index = faiss.IndexFlatIP(doc_embeddings.shape[1])
    index.add(doc_embeddings)
    scores, positions = index.search(query_embeddings, min(k + int(exclude_self), len(doc_ids)))
    run: Run = {}
    for row, query_id in enumerate(query_ids):
        hits = [(doc_ids[pos], float(score)) for pos, score in zip(positions[row], scores[row]) if pos >= 0]
        if exclude_self:
            hits = [(doc_id, score) for doc_id, score in hits if doc_id != query_id]
        run[query_id] = dict(hits[:k])
    return run


def retrieve(model: SentenceTransformer, dataset: RetrievalDataset, split: str, *, k: int = 100,
             batch_size: int = 64, show_progress: bool = True, exclude_self: bool = False,
             cache: EmbeddingCache | None = None) -> Run:
    """Top-k documents of the whole corpus for every labelled query of `split`.

    With `cache`, the corpus embeddings are read from (or stored in) that embedding cache,
    keyed by the model's exact state, so a frozen base is encoded once across evaluations.

    Raises:
        DataError: `split` does not exist (the message lists the splits that do).
    """
    return retrieve_splits(model, dataset, [split], k=k, batch_size=batch_size, show_progress=show_progress,
                           exclude_self=exclude_self, cache=cache)[split]


def retrieve_splits(model: SentenceTransformer, dataset: RetrievalDataset, splits: list[str], *, k: int = 100,
                    batch_size: int = 64, show_progress: bool = True, exclude_self: bool = False,
                    cache: EmbeddingCache | None = None) -> dict[str, Run]:
    """`retrieve` for several splits (split -> run), the corpus encoded once. Raises DataError (missing split)."""
    queries = {split: dataset.split_queries(split) for split in splits}  # a missing split fails before encoding
    if cache is not None:
        doc_ids, doc_embeddings = encode_corpus_cached(model, dataset, cache, batch_size=batch_size,
                                                       show_progress=show_progress).per_document()
    else:
        doc_ids, doc_embeddings = encode_corpus(model, dataset, batch_size=batch_size, show_progress=show_progress)
    runs = {}
    for split, texts in queries.items():
        query_ids = list(texts)
        query_embeddings = encode_texts(model, [texts[q] for q in query_ids], batch_size=batch_size,
                                        show_progress=False)
        runs[split] = search(doc_ids, doc_embeddings, query_ids, query_embeddings, k, exclude_self=exclude_self)
    return runs


def self_hits(run: Run) -> int:
    """How many queries of `run` retrieved a document whose id is the query's own."""
    return sum(query_id in ranking for query_id, ranking in run.items())


def check_run_ids(run: Run, dataset: RetrievalDataset, source: str = "the run") -> None:
    """Refuse a run that names queries or documents the dataset does not have.

    Raises:
        EvaluationError: naming how many ids are unknown, an example of each, and the fix.
    """
    problems = []
    unknown_queries = sorted(set(run) - set(dataset.queries))
    if unknown_queries:
        problems.append(f"{len(unknown_queries)} query id(s) not in {dataset.root}/queries.jsonl "
                        f"(e.g. {unknown_queries[0]!r})")
    unknown_docs = sorted({doc_id for ranking in run.values() for doc_id in ranking} - set(dataset.corpus))
    if unknown_docs:
        problems.append(f"{len(unknown_docs)} document id(s) not in {dataset.root}/corpus.jsonl "
                        f"(e.g. {unknown_docs[0]!r})")
    if problems:
        raise EvaluationError(f"{source}: " + "; ".join(problems) + ". Was it made for another dataset?")


def rerank(model: CrossEncoder, dataset: RetrievalDataset, first_stage: Run, *, k: int = 100,
           batch_size: int = 64, show_progress: bool = True) -> Run:
    """Rescore the top k of each query's first-stage ranking with a cross-encoder.

    Documents ranked below k in the first stage stay in the run, in their order, below the
    reranked ones, so recall at depths beyond k is that of the first stage.

    Raises:
        EvaluationError: the first stage names ids the dataset does not have.
    """
    return rerank_many(model, dataset, {"first stage": first_stage}, k=k, batch_size=batch_size,
                       show_progress=show_progress)["first stage"]


def rerank_many(model: CrossEncoder, dataset: RetrievalDataset, first_stages: dict[str, Run], *, k: int = 100,
                batch_size: int = 64, show_progress: bool = True) -> dict[str, Run]:
    """`rerank` of several first stages (name -> run), each distinct (query, document) pair scored once:
    first stages of one query overlap, and scoring is the cost. Raises EvaluationError (unknown ids)."""
    for name, run in first_stages.items():
        check_run_ids(run, dataset, f"the first-stage run ({name})" if len(first_stages) > 1 else "the first-stage run")
    keys = sorted({(query_id, doc_id) for run in first_stages.values() for query_id, ranking in run.items()
                   for doc_id, _ in ranked(ranking)[:k]})
    pairs = [(dataset.queries[query_id], dataset.corpus[doc_id].full_text) for query_id, doc_id in keys]
    if show_progress:
        print(f"Reranking {len(pairs)} (query, document) pairs", flush=True)
    with cached_views(model):  # a cosine-prior reranker encodes each query and document view once
        scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True) \
            if pairs else []
    scored = {key: float(score) for key, score in zip(keys, np.asarray(scores).reshape(-1))}
    return {name: _reranked(run, scored, k) for name, run in first_stages.items()}


def _reranked(first_stage: Run, scored: dict[tuple[str, str], float], k: int) -> Run:
    run: Run = {}
    for query_id, ranking in first_stage.items():
        order = ranked(ranking)
        run[query_id] = {doc_id: scored[(query_id, doc_id)] for doc_id, _ in order[:k]}
        floor = min(run[query_id].values(), default=0.0)
        for rank, (doc_id, _) in enumerate(order[k:], start=1):  # below k: the first stage's order, under the reranked
            run[query_id][doc_id] = floor - rank
    return run


def ranked(ranking: dict[str, float]) -> list[tuple[str, float]]:
    """(document id, score) pairs best first; ties broken by id, so every machine gets one order."""
    return sorted(ranking.items(), key=lambda item: (-item[1], item[0]))
