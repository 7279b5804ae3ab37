"""Gate: a clear win passes; worse, not significant, second-metric regression and too many
regressed queries are each rejected with their reason. Comparisons are real ranx comparisons of
synthetic runs whose per-query ranks are set by hand."""

from __future__ import annotations

import pytest

from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation import Run, compare_runs
from retrieval_lora.gate import GatePolicy, decide

N = 40
DISTRACTORS = [f"x{i}" for i in range(12)]
QRELS = {f"q{i}": {f"q{i}-a": 1, f"q{i}-b": 1} for i in range(N)}


def _run(ranks: list[tuple[int, int | None]]) -> Run:
    """Query i gets its relevant docs a and b at the given 1-based ranks (None: not retrieved)."""
    run = {}
    for i, (rank_a, rank_b) in enumerate(ranks):
        ranking = list(DISTRACTORS)
        for doc, rank in sorted(((f"q{i}-a", rank_a), (f"q{i}-b", rank_b)), key=lambda item: item[1] or 99):
            if rank is not None:
                ranking.insert(rank - 1, doc)
        run[f"q{i}"] = {doc: float(len(ranking) - position) for position, doc in enumerate(ranking)}
    return run


BASELINE = _run([(3 + i % 3, 8) for i in range(N)])  # a at rank 3-5, b at 8


def _compare(candidate: Run, baseline: Run = BASELINE, metrics=("ndcg@10", "mrr@10", "recall@10")):
    return compare_runs(QRELS, baseline, candidate, metrics=metrics, split="synthetic")


def test_a_clear_significant_win_passes() -> None:
    decision = decide(_compare(_run([(1 + i % 2, 8) for i in range(N)])))
    assert decision.passed and decision.failed_checks == []
    assert decision.gain > 0.1 and decision.p_value < 1e-4
    assert decision.reasons[0].startswith("ndcg@10 went from")
    assert any("gain is significant (paired t-test, p < 0.0001 < 0.05)" in r for r in decision.reasons)
    assert any("0 of 40 queries (0%) score lower" in r for r in decision.reasons)


def test_a_worse_candidate_is_rejected() -> None:
    decision = decide(_compare(_run([(6 + i % 3, 9) for i in range(N)])))
    assert not decision.passed and decision.failed_checks[0] == "gain"
    assert decision.reasons[0].startswith("the candidate is worse: ndcg@10 went from")
    assert decision.summary().startswith("FAILED: the candidate is worse")


def test_better_but_not_significant_is_rejected() -> None:
    # q0 and q1 move their first relevant doc up to rank 1, q3 moves both down (to 9 and 10); the
    # other 37 queries are unchanged: +0.013 nDCG@10 on average, but from 3 queries out of 40.
    ranks = [(3 + i % 3, 8) for i in range(N)]
    ranks[0], ranks[1], ranks[3] = (1, 8), (1, 8), (9, 10)
    comparison = _compare(_run(ranks))
    decision = decide(comparison)
    assert decision.gain > GatePolicy().min_gain, "the candidate must be better on average for this test"
    assert not decision.passed and decision.failed_checks == ["significance"]
    assert decision.reasons[0].startswith("the ndcg@10 gain is not significant (paired t-test, p = ")
    assert "may be noise on these 40 queries" in decision.reasons[0]
    relaxed = decide(comparison, GatePolicy(require_significance=False))
    assert relaxed.passed and any("which this policy allows" in r for r in relaxed.reasons)


def test_a_regression_on_a_second_metric_is_rejected() -> None:
    # First relevant doc moves to rank 1 (nDCG@10 and MRR up), the second falls out of the top 10:
    # recall@10 halves on every query.
    decision = decide(_compare(_run([(1, None) if i % 4 else (2, None) for i in range(N)])))
    assert decision.gain > 0 and decision.p_value < 0.05, "the primary metric itself must improve"
    assert not decision.passed and decision.failed_checks == ["other_metrics"]
    assert decision.reasons[0].startswith("another metric is significantly worse: recall@10 1.0000 -> 0.5000")


def test_too_many_regressed_queries_are_rejected() -> None:
    # 14 of 40 queries (35%) lose a little; the other 26 gain a lot.
    ranks = [(4, 8) if i < 14 else (1, 2) for i in range(N)]
    baseline = _run([(3, 8)] * N)
    decision = decide(_compare(_run(ranks), baseline), GatePolicy(max_regressed_share=0.25))
    assert decision.gain > 0 and decision.failed_checks == ["regressed_share"]
    assert decision.reasons[0] == ("too many queries regress: 14 of 40 queries (35%) score lower on ndcg@10 "
                                   "(26 higher, 0 unchanged); at most 25% allowed")
    assert decide(_compare(_run(ranks), baseline), GatePolicy(max_regressed_share=0.4)).passed


def test_a_gain_below_the_minimum_is_rejected() -> None:
    decision = decide(_compare(_run([(1 + i % 2, 8) for i in range(N)])), GatePolicy(min_gain=0.5))
    assert decision.failed_checks == ["gain"] and "at least +0.5000 is required" in decision.reasons[0]


def test_policy_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"alpha=1.5: must be in \(0, 1\).*max_regressed_share=2"):
        GatePolicy(alpha=1.5, max_regressed_share=2)
    with pytest.raises(ConfigError, match="primary_metric='map@100' was not evaluated; evaluated metrics: ndcg@10"):
        decide(_compare(BASELINE, metrics=("ndcg@10",)), GatePolicy(primary_metric="map@100"))


def test_decision_serializes_with_its_policy() -> None:
    data = decide(_compare(BASELINE)).to_dict()
    assert data["passed"] is False and data["policy"]["alpha"] == 0.05
    assert data["failed_checks"] == ["gain", "significance"]  # identical runs: no gain, nothing to test


# ---- baselines beyond the frozen base, and guards ---------------------------------------------
BETTER = _run([(1 + i % 2, 8) for i in range(N)])  # clearly better than BASELINE
BEST = _run([(1, 2) for _ in range(N)])  # both relevant documents on top


def test_a_candidate_that_beats_the_base_but_loses_to_bm25_is_refused_when_bm25_is_required() -> None:
    against_base = _compare(BETTER)
    against_bm25 = compare_runs(QRELS, BEST, BETTER, metrics=("ndcg@10", "mrr@10"), split="synthetic",
                                baseline_name="BM25", candidate_name="adapter")
    assert decide(against_base, baselines={"bm25": against_bm25}).passed  # the default judges the frozen base only
    decision = decide(against_base, GatePolicy(must_beat="base,bm25"), baselines={"bm25": against_bm25})
    assert not decision.passed and decision.failed_checks == ["bm25_gain", "bm25_significance"]
    assert decision.reasons[0].startswith("against BM25 (BM25 vs adapter): the candidate is worse: ndcg@10 went from")
    with pytest.raises(ConfigError, match="must_beat names hybrid, but the evaluation has no row for the BM25 \\+ "
                                          "frozen base hybrid"):
        decide(against_base, GatePolicy(must_beat="hybrid"), baselines={"bm25": against_bm25})
    with pytest.raises(ConfigError, match="must_beat='base,keyword': keyword unknown; use base, bm25, hybrid"):
        GatePolicy(must_beat="base,keyword")


def test_a_candidate_whose_guard_drops_too_far_is_refused() -> None:
    against_base = _compare(BETTER)
    guard = compare_runs(QRELS, BEST, BETTER, metrics=("ndcg@10",), split="test", baseline_name="frozen base",
                         candidate_name="adapter")
    drop = -guard.metrics["ndcg@10"].delta
    assert drop > 0.1
    decision = decide(against_base, GatePolicy(guard_max_drop=0.05), guards={"nfcorpus": guard})
    assert not decision.passed and decision.failed_checks == ["guard:nfcorpus"]
    assert decision.reasons[0].startswith("the adapter forgets: on the guard dataset nfcorpus (test, 40 queries) "
                                          "ndcg@10 went from ")
    assert "a drop larger than the 0.0500 allowed (guard_max_drop)" in decision.reasons[0]
    assert decide(against_base, GatePolicy(guard_max_drop=drop + 0.01), guards={"nfcorpus": guard}).passed
    steady = compare_runs(QRELS, BETTER, BETTER, metrics=("ndcg@10",), split="test")
    kept = decide(against_base, GatePolicy(guard_max_drop=0.0), guards={"nfcorpus": steady})
    assert kept.passed and any("+0.0000 (p = 1.0000); a drop of at most 0.0000 is allowed" in r for r in kept.reasons)
