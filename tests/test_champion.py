"""Champion/challenger: a candidate must beat the promoted version too, and promotion is a compare-and-swap."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_lora.errors import RegistryError
from retrieval_lora.evaluation import compare_runs
from retrieval_lora.gate import GatePolicy, decide
from retrieval_lora.registry import Registry
from test_gate import BASELINE, QRELS, N, _run

CHAMPION = _run([(1, 2) for _ in range(N)])  # both relevant documents on top for every query
CHALLENGER = _run([(1 + i % 2, 8) for i in range(N)])  # clearly better than BASELINE, worse than CHAMPION
LENIENT = GatePolicy(min_gain=0.0, require_significance=False, max_regressed_share=1.0)


def _against(champion, candidate, name: str = "demo@1"):
    return compare_runs(QRELS, champion, candidate, metrics=("ndcg@10", "mrr@10"), split="synthetic",
                        baseline_name=name)


def test_a_candidate_that_beats_the_base_but_not_the_champion_is_rejected() -> None:
    base = compare_runs(QRELS, BASELINE, CHALLENGER, metrics=("ndcg@10", "mrr@10"), split="synthetic")
    assert decide(base).passed  # against the frozen base alone it would be promoted
    decision = decide(base, GatePolicy(), champion=_against(CHAMPION, CHALLENGER))
    assert not decision.passed and decision.failed_checks[0] == "champion_gain"
    assert decision.reasons[0].startswith("against the champion demo@1: the candidate is worse")
    assert decision.champion == "demo@1" and decision.champion_value > decision.candidate
    assert decide(base, GatePolicy(against_champion=False), champion=_against(CHAMPION, CHALLENGER)).passed


def test_a_tie_with_the_champion_keeps_the_champion() -> None:
    base = compare_runs(QRELS, BASELINE, CHALLENGER, metrics=("ndcg@10",), split="synthetic")
    decision = decide(base, LENIENT, champion=_against(CHALLENGER, CHALLENGER))
    assert not decision.passed and "against the champion demo@1: no gain" in decision.reasons[0]
    better = decide(base, LENIENT, champion=_against(BASELINE, CHALLENGER))
    assert better.passed and any(r.startswith("against the champion demo@1: ndcg@10 went") for r in better.reasons)


@pytest.fixture
def two_adapters(tmp_path_factory, base_path: str) -> tuple[Path, Path]:
    from test_registry import _adapter

    root = tmp_path_factory.mktemp("champion-adapters")
    for key, seed in (("a", 1), ("b", 2)):
        _adapter(base_path, root / key, seed)
    return root / "a", root / "b"


def test_a_promotion_between_decision_and_publish_is_detected(two_adapters, tmp_path: Path) -> None:
    from retrieval_lora.pipeline import PublishConfig, publish

    registry = Registry(tmp_path / "reg")
    first = registry.register("demo", two_adapters[0], decision={"passed": True, "reasons": []})
    base = compare_runs(QRELS, BASELINE, CHALLENGER, metrics=("ndcg@10",), split="synthetic")
    decision = decide(base, LENIENT)  # made when nothing was promoted: no champion
    registry.promote("demo", first.version)  # ... and then someone else promotes demo@1
    with pytest.raises(RegistryError, match="promoted version changed from None to 1"):
        registry.promote("demo", first.version, expected=None)
    # a stale decision is refused before anything is registered, so no comparison is read
    done = publish(PublishConfig(registry=str(registry.root)), None, decision, two_adapters[1], name="demo",
                   report_dir=tmp_path, config={})
    assert done.status == "stale" and "now promotes demo@1" in done.message
    assert [v.version for v in registry.versions("demo")] == [1] and registry.promoted("demo").version == 1
