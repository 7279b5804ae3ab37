"""Scoring runs with ranx, and comparing two runs query by query with a paired significance test.

A query of the qrels that is missing from a run scores 0 on every metric (it was not answered).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from ranx import Qrels as RanxQrels
from ranx import Run as RanxRun
from ranx import compare as ranx_compare
from ranx import evaluate as ranx_evaluate
from ranx.meta.evaluate import extract_metric_and_params, metric_switch

from retrieval_lora.data.beir import Qrels
from retrieval_lora.errors import ConfigError, EvaluationError
from retrieval_lora.evaluation.runs import Run, ranked
from retrieval_lora.evaluation.settings import DEFAULT_METRICS, STAT_TESTS

TIE_TOLERANCE = 1e-9
_EMPTY = "__no_result__"  # placeholder document for a query a run left empty (ranx needs one)


def _ranx_pair(qrels: Qrels, run: Run, name: str = "run") -> tuple[RanxQrels, RanxRun]:
    """ranx objects over exactly the queries of `qrels` (a missing or empty ranking scores 0)."""
    if not run:
        raise EvaluationError("the run is empty: nothing was retrieved; check the corpus and the split")
    unknown = sorted(set(run) - set(qrels))
    if unknown:
        raise EvaluationError(f"the run has {len(unknown)} query id(s) not in the qrels (e.g. {unknown[0]!r}); "
                              "evaluate it against the split it was made for")
    full_run = {query_id: _rank_scores(run.get(query_id) or {_EMPTY: 0.0}) for query_id in qrels}
    return RanxQrels(qrels), RanxRun(full_run, name=name)


def _rank_scores(ranking: dict[str, float]) -> dict[str, float]:
    """The ranking with its scores replaced by descending rank values, in `ranked` order.

    Every metric we compute depends on the order alone; ranx sorts scores with an unstable sort,
    so documents with equal scores (identical texts) would be ordered differently for the same
    run held in memory and read back from its TREC file. Ranks break ties by document id, the
    one order every caller (and the saved run) uses.
    """
    return {doc_id: float(len(ranking) - position) for position, (doc_id, _) in enumerate(ranked(ranking))}


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
