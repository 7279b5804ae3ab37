"""Building runs (retrieve, rerank), scoring them with ranx, and comparing two of them.

A run is plain data: query id -> {document id -> score}, the same shape as qrels. Retrieval
uses exact inner-product search in FAISS over normalized embeddings (cosine similarity).

- `retrieve`: the top k of the whole corpus per query of a split; `exclude_self=True` drops a
  query's own id from its results (for datasets whose queries are also documents).
- `rerank`: a cross-encoder rescores the top k of a first-stage run (the base embedder's, or a
  TREC run file read with `read_trec_run`, whose ids are checked against the dataset).
- `score_run`: mean metrics (ranx names: "ndcg@10", "mrr@10", "recall@100", "map@100", ...).
- `compare_runs`: baseline vs candidate on the same queries with ranx's paired significance
  test (`ranx.compare`), per-query scores, wins/losses/ties and the worst regressions.
- `compare_with_base`: all of the above for an adapter against its frozen base. For a
  reranker the baseline is the better (on the primary metric) of the first-stage ranking alone
  and the frozen base reranker.

A query of the split that is missing from a run scores 0 on every metric (it was not answered).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from ranx import Qrels as RanxQrels
from ranx import Run as RanxRun
from ranx import compare as ranx_compare
from ranx import evaluate as ranx_evaluate
from ranx.meta.evaluate import extract_metric_and_params, metric_switch
from sentence_transformers import CrossEncoder, SentenceTransformer

from retrieval_lora.data.beir import Qrels, RetrievalDataset
from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached
from retrieval_lora.encoding import encode_corpus, encode_texts
from retrieval_lora.errors import ConfigError, EvaluationError
from retrieval_lora.models import RetrievalModel, load_base, transformer_of

Run = dict[str, dict[str, float]]
DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
STAT_TESTS = ("student", "fisher")  # ranx's paired tests (lowercase names; "tukey" is not paired)
TIE_TOLERANCE = 1e-9
_EMPTY = "__no_result__"  # placeholder document for a query a run left empty (ranx needs one)


# ---- building runs -----------------------------------------------------------------------

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
    queries = dataset.split_queries(split)
    if cache is not None:
        doc_ids, doc_embeddings = encode_corpus_cached(model, dataset, cache, batch_size=batch_size,
                                                       show_progress=show_progress).per_document()
    else:
        doc_ids, doc_embeddings = encode_corpus(model, dataset, batch_size=batch_size, show_progress=show_progress)
    query_ids = list(queries)
    query_embeddings = encode_texts(model, [queries[q] for q in query_ids], batch_size=batch_size,
                                    show_progress=False)
    return search(doc_ids, doc_embeddings, query_ids, query_embeddings, k, exclude_self=exclude_self)


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
    check_run_ids(first_stage, dataset, "the first-stage run")
    pairs, keys = [], []
    for query_id, ranking in first_stage.items():
        for doc_id, _ in _ranked(ranking)[:k]:
            pairs.append((dataset.queries[query_id], dataset.corpus[doc_id].full_text))
            keys.append((query_id, doc_id))
    if show_progress:
        print(f"Reranking {len(pairs)} (query, document) pairs", flush=True)
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True) \
        if pairs else []
    run: Run = {query_id: {} for query_id in first_stage}
    for (query_id, doc_id), score in zip(keys, np.asarray(scores).reshape(-1)):
        run[query_id][doc_id] = float(score)
    for query_id, ranking in first_stage.items():  # documents below k keep their order, under the reranked ones
        floor = min(run[query_id].values(), default=0.0)
        for rank, (doc_id, _) in enumerate(_ranked(ranking)[k:], start=1):
            run[query_id][doc_id] = floor - rank
    return run


def _ranked(ranking: dict[str, float]) -> list[tuple[str, float]]:
    # Ties are broken by document id so that a run gives the same order on every machine.
    return sorted(ranking.items(), key=lambda item: (-item[1], item[0]))


# ---- TREC run files ----------------------------------------------------------------------

def read_trec_run(path: str | Path, dataset: RetrievalDataset | None = None) -> Run:
    """Read a TREC run file: one `query_id Q0 doc_id rank score tag` line per retrieved document.

    With `dataset`, every query and document id must exist in it.

    Raises:
        EvaluationError: missing file, a malformed line (file:line named), or unknown ids.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"run file {path} does not exist; give a TREC run (query Q0 doc rank score tag)")
    run: Run = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 6:
                raise ValueError(f"{len(parts)} fields")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError as exc:
            raise EvaluationError(f"{path}:{number}: not a TREC run line ({exc}): expected 6 fields "
                                  f"'query_id Q0 doc_id rank score tag', got {line.strip()[:80]!r}") from exc
    if not run:
        raise EvaluationError(f"run file {path} is empty")
    if dataset is not None:
        check_run_ids(run, dataset, f"run file {path}")
    return run


def write_trec_run(run: Run, path: str | Path, tag: str = "retrieval-lora") -> Path:
    """Write `run` as a TREC run file (best first per query), atomically."""
    from retrieval_lora.manifest import write_text_atomic

    lines = [f"{query_id} Q0 {doc_id} {rank} {score:.6f} {tag}"
             for query_id in sorted(run) for rank, (doc_id, score) in enumerate(_ranked(run[query_id]), start=1)]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
    return Path(path)


# ---- scoring -----------------------------------------------------------------------------

def _ranx_pair(qrels: Qrels, run: Run, name: str = "run") -> tuple[RanxQrels, RanxRun]:
    """ranx objects over exactly the queries of `qrels` (a missing or empty ranking scores 0)."""
    if not run:
        raise EvaluationError("the run is empty: nothing was retrieved; check the corpus and the split")
    unknown = sorted(set(run) - set(qrels))
    if unknown:
        raise EvaluationError(f"the run has {len(unknown)} query id(s) not in the qrels (e.g. {unknown[0]!r}); "
                              "evaluate it against the split it was made for")
    full_run = {query_id: run.get(query_id) or {_EMPTY: 0.0} for query_id in qrels}
    return RanxQrels(qrels), RanxRun(full_run, name=name)


def check_metrics(metrics: tuple[str, ...] | list[str]) -> list[str]:
    """`metrics` as a list, if ranx knows every name. Raises ConfigError naming the bad one."""
    if not metrics:
        raise ConfigError("metrics is empty: give ranx metric names such as ndcg@10,mrr@10,recall@100")
    try:  # ranx's own parser, without evaluating (which would also change numba's thread count)
        for metric in metrics:
            metric_switch(extract_metric_and_params(metric)[0])
    except ValueError as exc:
        raise ConfigError(f"metrics={','.join(metrics)}: {exc}; use ranx names such as ndcg@10, mrr@10, "
                          "recall@100, map@100, precision@5") from exc
    return list(metrics)


def score_run(qrels: Qrels, run: Run, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels` (a query missing from `run` scores 0).

    Raises:
        EvaluationError: empty run, or query ids that are not in the qrels.
    """
    ranx_qrels, ranx_run = _ranx_pair(qrels, run)
    scores = ranx_evaluate(ranx_qrels, ranx_run, check_metrics(metrics))
    if isinstance(scores, float):
        scores = {metrics[0]: scores}
    return {name: float(value) for name, value in scores.items()}


@dataclass
class MetricResult:
    """One metric of a baseline and a candidate over the same queries, with the paired test."""

    metric: str
    baseline: float
    candidate: float
    p_value: float  # 1.0 when the two are identical on every query
    wins: int  # queries where the candidate scores higher
    losses: int
    ties: int

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha


@dataclass
class QueryDelta:
    """One query's score under baseline and candidate on one metric."""

    query_id: str
    text: str
    baseline: float
    candidate: float

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline


@dataclass
class PairedComparison:
    """Baseline vs candidate on one split: means, paired p-values, per-query scores."""

    split: str
    baseline_name: str
    candidate_name: str
    stat_test: str
    metrics: dict[str, MetricResult]
    per_query: dict[str, dict[str, tuple[float, float]]]  # metric -> query id -> (baseline, candidate)
    query_texts: dict[str, str] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return len(next(iter(self.per_query.values()), {}))

    def query_deltas(self, metric: str) -> list[QueryDelta]:
        """Every query's scores on `metric`, worst regression first (ties by query id)."""
        rows = [QueryDelta(qid, self.query_texts.get(qid, ""), base, cand)
                for qid, (base, cand) in self.per_query[self._known(metric)].items()]
        return sorted(rows, key=lambda row: (row.delta, row.query_id))

    def worst_regressions(self, metric: str, n: int = 10) -> list[QueryDelta]:
        """The at most `n` queries whose `metric` dropped most (only queries that dropped)."""
        return [row for row in self.query_deltas(metric) if row.delta < -TIE_TOLERANCE][:n]

    def regressed_share(self, metric: str) -> float:
        """Share of queries whose `metric` is lower under the candidate."""
        result = self.metrics[self._known(metric)]
        return result.losses / max(1, result.wins + result.losses + result.ties)

    def _known(self, metric: str) -> str:
        if metric not in self.metrics:
            raise ConfigError(f"metric {metric!r} was not evaluated; evaluated: {', '.join(self.metrics)}")
        return metric

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-query scores included)."""
        return {
            "split": self.split, "baseline_name": self.baseline_name, "candidate_name": self.candidate_name,
            "stat_test": self.stat_test, "num_queries": self.num_queries,
            "metrics": {name: {"baseline": r.baseline, "candidate": r.candidate, "delta": r.delta,
                               "p_value": r.p_value, "wins": r.wins, "losses": r.losses, "ties": r.ties}
                        for name, r in self.metrics.items()},
            "per_query": {name: {qid: list(pair) for qid, pair in rows.items()} for name, rows in self.per_query.items()},
        }


def compare_runs(qrels: Qrels, baseline_run: Run, candidate_run: Run, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
                 stat_test: str = "student", split: str = "", baseline_name: str = "baseline",
                 candidate_name: str = "candidate", query_texts: dict[str, str] | None = None) -> PairedComparison:
    """Score two runs on the same queries and test each metric's difference with `ranx.compare`.

    Args:
        stat_test: "student" (two-sided paired t-test) or "fisher" (randomization test, seeded).

    Raises:
        ConfigError: unknown metric or test. EvaluationError: empty run or unknown query ids.
    """
    if stat_test not in STAT_TESTS:
        raise ConfigError(f"stat_test={stat_test!r}: must be one of {', '.join(STAT_TESTS)} (a paired test)")
    metrics = tuple(check_metrics(metrics))
    ranx_qrels, base = _ranx_pair(qrels, baseline_run, "baseline")
    _, cand = _ranx_pair(qrels, candidate_run, "candidate")
    with warnings.catch_warnings():  # scipy warns on identical samples; we map their NaN p-value to 1
        warnings.simplefilter("ignore", RuntimeWarning)
        report = ranx_compare(ranx_qrels, [base, cand], list(metrics), stat_test=stat_test, max_p=1.0)
    per_query = {m: {qid: (float(base.scores[m][qid]), float(cand.scores[m][qid])) for qid in qrels} for m in metrics}
    results = {}
    for m in metrics:
        p_value = float(report.comparisons[("baseline", "candidate")][m]["p_value"])
        deltas = [cand_score - base_score for base_score, cand_score in per_query[m].values()]
        results[m] = MetricResult(m, float(report.results["baseline"][m]), float(report.results["candidate"][m]),
                                  1.0 if math.isnan(p_value) else p_value,
                                  wins=sum(d > TIE_TOLERANCE for d in deltas), losses=sum(d < -TIE_TOLERANCE for d in deltas),
                                  ties=sum(abs(d) <= TIE_TOLERANCE for d in deltas))
    return PairedComparison(split, baseline_name, candidate_name, stat_test, results, per_query, dict(query_texts or {}))


# ---- an adapter against its frozen base --------------------------------------------------

@dataclass
class Comparison:
    """Metrics of a baseline and of the adapter on the same split, and the runs behind them.

    `paired` holds the significance tests and per-query scores; `baselines` the metrics of
    every baseline considered (for a reranker: the first stage and the frozen base reranker;
    `baseline_name` is the one kept, the better on `primary_metric`).
    """

    split: str
    baseline_name: str
    baseline: dict[str, float]
    adapter: dict[str, float]
    baseline_run: Run
    adapter_run: Run
    paired: PairedComparison | None = None
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def compare_with_base(task: str, model: RetrievalModel, dataset: RetrievalDataset, split: str, *,
                      base: str, k: int = 100, rerank_k: int = 20, batch_size: int = 64,
                      metrics: tuple[str, ...] = DEFAULT_METRICS, stat_test: str = "student",
                      primary_metric: str | None = None, exclude_self: bool = False, first_stage: Run | None = None,
                      base_reranker: bool = True, show_progress: bool = True,
                      cache: EmbeddingCache | None = None, baseline_run: Run | None = None,
                      baseline_name: str = "baseline run") -> Comparison:
    """Score the frozen base and the adapter (on `model`) on `split`, with paired tests.

    Embedder: the same model with its adapter switched off is the baseline. Reranker: the
    adapter reranks the top `rerank_k` of `first_stage` (default: the frozen base embedder's
    top k); the baseline is the better on `primary_metric` (default: the first metric) of that
    first stage alone and the frozen base reranker (`base_reranker=False` skips the latter).
    `cache` (an `EmbeddingCache`) lets retrieval reuse corpus embeddings of an identical model.
    `baseline_run` (named `baseline_name`), e.g. the frozen base's run saved by an earlier
    evaluation or a BM25 run: for an embedder it replaces recomputing the frozen base; for a
    reranker it is one more baseline to beat.

    Raises:
        DataError: missing split. EvaluationError: a first stage with unknown ids.
        ConfigError: unknown metric or statistical test.
    """
    qrels = dataset.split_qrels(split)
    primary = primary_metric or metrics[0]
    if primary not in metrics:
        raise ConfigError(f"primary metric {primary!r} is not among the metrics {', '.join(metrics)}")
    options = dict(batch_size=batch_size, show_progress=show_progress)
    if baseline_run is not None:
        check_run_ids(baseline_run, dataset, baseline_name)
        baseline_run = {qid: ranking for qid, ranking in baseline_run.items() if qid in qrels}
    if task == "embedder":
        if baseline_run is not None:
            runs = {baseline_name: baseline_run}
        else:
            with transformer_of(model).disable_adapter():
                runs = {"frozen base embedder": retrieve(model, dataset, split, k=k, exclude_self=exclude_self,
                                                         cache=cache, **options)}
        adapter_run = retrieve(model, dataset, split, k=k, exclude_self=exclude_self, cache=cache, **options)
    else:
        if first_stage is None:
            embedder = load_base("embedder", base)
            first_stage = retrieve(embedder, dataset, split, k=k, exclude_self=exclude_self, cache=cache, **options)
        check_run_ids(first_stage, dataset, "the first-stage run")
        first_stage = {qid: ranking for qid, ranking in first_stage.items() if qid in qrels}
        runs = {"first stage alone (no reranking)": first_stage}
        if base_reranker:
            with transformer_of(model).disable_adapter():
                runs["frozen base reranker"] = rerank(model, dataset, first_stage, k=rerank_k, **options)
        if baseline_run is not None:
            runs[baseline_name] = baseline_run
        adapter_run = rerank(model, dataset, first_stage, k=rerank_k, **options)
    scored = {name: score_run(qrels, run, metrics) for name, run in runs.items()}
    name = max(scored, key=lambda n: scored[n][primary])  # ties keep the first (the cheaper baseline)
    texts = {qid: dataset.queries.get(qid, "") for qid in qrels}
    paired = compare_runs(qrels, runs[name], adapter_run, metrics=metrics, stat_test=stat_test, split=split,
                          baseline_name=name, candidate_name="adapter", query_texts=texts)
    return Comparison(split, name, scored[name], {m: r.candidate for m, r in paired.metrics.items()},
                      runs[name], adapter_run, paired, scored)
