"""Building runs (retrieve, rerank) and scoring them with ranx.

A run is plain data: query id -> {document id -> score}, the same shape as qrels. Retrieval
uses exact inner-product search in FAISS over normalized embeddings (cosine similarity).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from ranx import Qrels as RanxQrels
from ranx import Run as RanxRun
from ranx import evaluate as ranx_evaluate
from sentence_transformers import CrossEncoder, SentenceTransformer

from retrieval_lora.data.beir import Qrels, RetrievalDataset
from retrieval_lora.encoding import encode_corpus, encode_texts
from retrieval_lora.errors import EvaluationError
from retrieval_lora.models import RetrievalModel, load_base, transformer_of

Run = dict[str, dict[str, float]]
DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def search(doc_ids: list[str], doc_embeddings: np.ndarray, query_ids: list[str], query_embeddings: np.ndarray,
           k: int) -> Run:
    """Exact top-k inner-product search: the k best documents per query with their scores."""
    index = faiss.IndexFlatIP(doc_embeddings.shape[1])
    index.add(doc_embeddings)
    scores, positions = index.search(query_embeddings, min(k, len(doc_ids)))
    return {
        query_id: {doc_ids[pos]: float(score) for pos, score in zip(positions[row], scores[row]) if pos >= 0}
        for row, query_id in enumerate(query_ids)
    }


def retrieve(model: SentenceTransformer, dataset: RetrievalDataset, split: str, *, k: int = 100,
             batch_size: int = 64, show_progress: bool = True) -> Run:
    """Top-k documents of the whole corpus for every labelled query of `split`."""
    queries = dataset.split_queries(split)
    doc_ids, doc_embeddings = encode_corpus(model, dataset, batch_size=batch_size, show_progress=show_progress)
    query_ids = list(queries)
    query_embeddings = encode_texts(model, [queries[q] for q in query_ids], batch_size=batch_size,
                                    show_progress=False)
    return search(doc_ids, doc_embeddings, query_ids, query_embeddings, k)


def rerank(model: CrossEncoder, dataset: RetrievalDataset, first_stage: Run, *, k: int = 100,
           batch_size: int = 64, show_progress: bool = True) -> Run:
    """Rescore the top k of each query's first-stage ranking with a cross-encoder.

    Documents ranked below k in the first stage stay in the run, in their order, below the
    reranked ones, so recall at depths beyond k is that of the first stage.
    """
    pairs, keys = [], []
    for query_id, ranking in first_stage.items():
        top = sorted(ranking.items(), key=lambda item: -item[1])[:k]
        for doc_id, _ in top:
            pairs.append((dataset.queries[query_id], dataset.corpus[doc_id].full_text))
            keys.append((query_id, doc_id))
    if show_progress:
        print(f"Reranking {len(pairs)} (query, document) pairs", flush=True)
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True)
    run: Run = {query_id: {} for query_id in first_stage}
    for (query_id, doc_id), score in zip(keys, np.asarray(scores).reshape(-1)):
        run[query_id][doc_id] = float(score)
    for query_id, ranking in first_stage.items():  # documents below k keep their order, under the reranked ones
        tail = sorted(ranking.items(), key=lambda item: -item[1])[k:]
        floor = min(run[query_id].values(), default=0.0)
        for rank, (doc_id, _) in enumerate(tail, start=1):
            run[query_id][doc_id] = floor - rank
    return run


def score_run(qrels: Qrels, run: Run, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels` (a query missing from `run` scores 0)."""
    if not run:
        raise EvaluationError("the run is empty: nothing was retrieved; check the corpus and the split")
    unknown = sorted(set(run) - set(qrels))
    if unknown:
        raise EvaluationError(f"the run has {len(unknown)} query id(s) not in the qrels (e.g. {unknown[0]!r}); "
                              "evaluate it against the split it was made for")
    full_run = {query_id: run.get(query_id, {}) or {"__none__": 0.0} for query_id in qrels}
    scores = ranx_evaluate(RanxQrels(qrels), RanxRun(full_run), list(metrics))
    if isinstance(scores, float):
        scores = {metrics[0]: scores}
    return {name: float(value) for name, value in scores.items()}


@dataclass
class Comparison:
    """Metrics of a baseline and of the adapter on the same split, and the runs behind them."""

    split: str
    baseline_name: str
    baseline: dict[str, float]
    adapter: dict[str, float]
    baseline_run: Run
    adapter_run: Run


def compare_with_base(task: str, model: RetrievalModel, dataset: RetrievalDataset, split: str, *,
                      base: str, k: int = 100, rerank_k: int = 20, batch_size: int = 64,
                      metrics: tuple[str, ...] = DEFAULT_METRICS) -> Comparison:
    """Score the frozen base and the adapter (on `model`) on `split`.

    Embedder: the same model with its adapter switched off is the baseline. Reranker: the
    baseline is the frozen base embedder's ranking, which the adapter reranks (top `rerank_k`).
    """
    qrels = dataset.split_qrels(split)
    if task == "embedder":
        with transformer_of(model).disable_adapter():
            baseline_run = retrieve(model, dataset, split, k=k, batch_size=batch_size)
        adapter_run = retrieve(model, dataset, split, k=k, batch_size=batch_size)
        name = "frozen base embedder"
    else:
        first_stage = retrieve(load_base("embedder", base), dataset, split, k=k, batch_size=batch_size)
        baseline_run, name = first_stage, "frozen base embedder (no reranking)"
        adapter_run = rerank(model, dataset, first_stage, k=rerank_k, batch_size=batch_size)
    return Comparison(split, name, score_run(qrels, baseline_run, metrics), score_run(qrels, adapter_run, metrics),
                      baseline_run, adapter_run)
