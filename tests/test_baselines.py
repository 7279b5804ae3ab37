"""Baselines a user compares before shipping: BM25 (bm25s, cached index), ranx fusion with weights chosen
on the dev split only, and the evaluation's rows, paired tests, verdict and report table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_lora.data import load_dataset
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation import BM25Settings, bm25_runs, choose_fusion, fuse_runs, score_run
from retrieval_lora.evaluation import fusion as fusion_module
from retrieval_lora.evaluation import lexical
from retrieval_lora.pipeline import DataConfig, EvaluationConfig, SpecializeConfig


# ---- BM25 -----------------------------------------------------------------------------------

def test_bm25_finds_documents_by_their_stemmed_terms(tiny_beir: Path) -> None:
    dataset = load_dataset(str(tiny_beir))
    run = bm25_runs(dataset, ["train", "test"], k=5)
    assert set(run) == {"train", "test"}
    # Lucene's 33 English stop words keep "has" and "which": "which animal has a trunk" ranks the short
    # "A violin has four strings." above the elephant's "trunk", as Lucene's BM25 would.
    assert list(run["train"]["q1"])[:2] == ["x5", "d1"]
    assert next(iter(run["train"]["q6"])) == "d6"  # "animal that builds dams" -> "build dams" (stemmed)
    assert next(iter(run["test"]["q12"])) == "d12"  # "animal with a pouch" -> "pouch"
    assert all(len(ranking) <= 5 and all(score > 0 for score in ranking.values()) for ranking in run["train"].values())
    assert score_run(dataset.split_qrels("train"), run["train"])["ndcg@10"] > 0.5


def test_bm25_index_is_cached_per_corpus_and_settings(tiny_beir: Path, tmp_path: Path, monkeypatch) -> None:
    dataset = load_dataset(str(tiny_beir))
    cache = tmp_path / "cache"
    first = bm25_runs(dataset, ["train"], k=5, cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("bm25-")
    assert (cache / entries[0] / "doc_ids.json").is_file()
    import bm25s

    def no_indexing(*_args, **_kwargs):
        raise AssertionError("the cached index should have been read, not rebuilt")

    monkeypatch.setattr(bm25s.BM25, "index", no_indexing)
    assert bm25_runs(dataset, ["train"], k=5, cache_dir=cache) == first
    monkeypatch.undo()
    bm25_runs(dataset, ["train"], BM25Settings(k1=1.2, b=0.75), k=5, cache_dir=cache)  # other settings: new entry
    assert len(list(cache.iterdir())) == 2
    assert lexical.cache_key(dataset, BM25Settings()) != lexical.cache_key(dataset, BM25Settings(stemmer=""))


def test_bm25_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"k1=-1, b=0.4: need k1 >= 0"):
        BM25Settings(k1=-1)
    with pytest.raises(ConfigError, match="stemmer 'klingon' is not a PyStemmer algorithm"):
        lexical.BM25Index(None, [], BM25Settings(stemmer="klingon"))


# ---- fusion ---------------------------------------------------------------------------------
# Two queries per split. The lexical run finds the relevant document of the dev queries, the dense
# run those of the test queries: a weight chosen on dev favours BM25, one chosen on test would favour dense.
LEXICAL = {"d1": {"a": 0.9, "x": 0.1}, "d2": {"b": 0.8, "x": 0.2}, "t1": {"x": 0.9, "c": 0.1}, "t2": {"x": 0.8, "e": 0.2}}
DENSE = {"d1": {"x": 0.9, "a": 0.1}, "d2": {"x": 0.8, "b": 0.2}, "t1": {"c": 0.9, "x": 0.1}, "t2": {"e": 0.9, "x": 0.2}}
DEV_QRELS = {"d1": {"a": 1}, "d2": {"b": 1}}
TEST_QRELS = {"t1": {"c": 1}, "t2": {"e": 1}}


def _split(run, qrels):
    return {q: run[q] for q in qrels}


def test_the_convex_weight_is_chosen_on_the_dev_queries_only(monkeypatch) -> None:
    seen = []
    real = __import__("ranx").optimize_fusion

    def spy(qrels, runs, **kwargs):
        seen.append((set(qrels.keys()), [set(run.keys()) for run in runs]))
        return real(qrels, runs, **kwargs)

    monkeypatch.setattr("ranx.optimize_fusion", spy)
    choice = choose_fusion("convex", DEV_QRELS, [_split(LEXICAL, DEV_QRELS), _split(DENSE, DEV_QRELS)], "ndcg@10",
                           split="dev")
    assert seen == [({"d1", "d2"}, [{"d1", "d2"}, {"d1", "d2"}])]  # only dev queries reached ranx
    assert choice.weights[0] > 0.5 and choice.chosen_on == "dev" and "on the 2 queries of split 'dev'" in choice.reason
    on_test = choose_fusion("convex", TEST_QRELS, [_split(LEXICAL, TEST_QRELS), _split(DENSE, TEST_QRELS)], "ndcg@10",
                            split="test")
    assert on_test.weights[0] < 0.5  # the test split would have chosen the other way
    fused = fuse_runs([_split(LEXICAL, TEST_QRELS), _split(DENSE, TEST_QRELS)], choice)
    assert score_run(TEST_QRELS, fused)["ndcg@10"] < 1.0  # the honest (dev-chosen) figure is reported


def test_without_a_dev_split_the_weights_are_equal_and_the_choice_says_why() -> None:
    choice = choose_fusion("convex", None, None, "ndcg@10", split=None, unavailable="the dataset has no 'dev' split")
    assert choice.weights == (0.5, 0.5) and choice.chosen_on is None
    assert "equal weights (w_bm25 = 0.5): the dataset has no 'dev' split" in choice.reason
    assert choice.label() == "convex, w_bm25 = 0.5"


def test_rrf_fuses_by_rank_with_k_60() -> None:
    choice = choose_fusion("rrf", None, None, "ndcg@10", split=None)
    fused = fuse_runs([{"q": {"a": 3.0, "b": 2.0}}, {"q": {"b": 0.9, "c": 0.1}, "r": {"z": 1.0}}], choice)
    assert fused["q"] == pytest.approx({"b": 1 / 62 + 1 / 61, "a": 1 / 61, "c": 1 / 62})
    assert fused["r"] == pytest.approx({"z": 1 / 61})  # a query only one run answered keeps that run's ranking
    assert list(fused["q"]) == ["b", "a", "c"]
    with pytest.raises(ConfigError, match="'borda'"):
        choose_fusion("borda", None, None, "ndcg@10", split=None)


def test_evaluation_settings_refuse_fusing_on_the_evaluated_split() -> None:
    with pytest.raises(ConfigError, match="fusion_split='test' is the evaluated split"):
        EvaluationConfig(fusion_split="test")
    with pytest.raises(ConfigError, match=r"fusion='convex,borda': borda unknown"):
        EvaluationConfig(fusion="convex,borda")
    with pytest.raises(ConfigError, match="must_beat names bm25, but the evaluation scores no BM25"):
        SpecializeConfig(evaluation=EvaluationConfig(bm25=False), gate={"must_beat": "bm25"})


# ---- the evaluation's rows, with the real model -----------------------------------------------

@pytest.fixture(scope="module")
def embedder_adapter(tmp_path_factory, base_path: str) -> Path:
    from test_evaluation import _save_random_adapter

    return _save_random_adapter("embedder", base_path, tmp_path_factory.mktemp("baselines") / "adapter")


def test_the_evaluation_scores_every_row_on_the_same_queries_and_never_fuses_on_test(
        embedder_adapter: Path, tiny_beir: Path, base_path: str, tmp_path: Path, monkeypatch) -> None:
    from retrieval_lora.pipeline import Candidate, decide, evaluate_candidate, write_report
    from retrieval_lora.gate import GatePolicy

    dataset = load_dataset(str(tiny_beir))
    seen = []
    real = fusion_module.choose_fusion

    def spy(method, qrels, runs, metric, **kwargs):
        seen.append((method, sorted(qrels or {}), [sorted(run) for run in runs or []]))
        return real(method, qrels, runs, metric, **kwargs)

    monkeypatch.setattr("retrieval_lora.evaluation.comparison.choose_fusion", spy)
    evaluation = EvaluationConfig(top_k=10)
    comparison = evaluate_candidate(Candidate("embedder", embedder_adapter, base_path, 32), dataset, evaluation,
                                    DataConfig(cache_dir=str(tmp_path / "cache")), "ndcg@10", show_progress=False)
    dev, test = sorted(dataset.split_qrels("dev")), sorted(dataset.split_qrels("test"))
    assert seen and all(qrels in ([], dev) and all(ids == dev for ids in runs) for _, qrels, runs in seen)
    assert not any(set(test) & set(qrels) for _, qrels, _ in seen)
    names = [row.name for row in comparison.systems]
    assert names[:3] == ["BM25", "frozen base embedder", "adapter"]
    assert [row.role for row in comparison.systems[3:]] == ["hybrid-base", "hybrid-adapter"] * 2
    assert all(set(run) <= set(test) for run in comparison.system_runs.values())  # one split, the same queries
    assert comparison.fusion[names[3]].chosen_on == "dev" and names[5].endswith("(RRF, k = 60)")
    assert comparison.tests["BM25"].candidate_name == "adapter"
    assert comparison.tests[names[3]].candidate_name == names[4]  # hybrid of the adapter vs hybrid of the base
    assert comparison.roles == {"bm25": "BM25", "hybrid": names[3]}
    best = comparison.best_system()
    assert best.metrics["ndcg@10"] == max(row.metrics["ndcg@10"] for row in comparison.systems)
    assert comparison.best_vs_runner_up.candidate_name == best.name
    assert (cache := tmp_path / "cache").is_dir() and any(p.name.startswith("bm25-") for p in cache.iterdir())
    decision = decide(comparison, GatePolicy(min_gain=0.0, require_significance=False, max_regressed_share=1.0,
                                             must_beat="base,bm25,hybrid"))
    assert any(reason.startswith("against BM25 (BM25 vs adapter)") for reason in decision.reasons)
    out = tmp_path / "report"
    write_report(out, comparison, decision, {"dataset": "tiny"}, evaluation, title="t")
    report = (out / "report.md").read_text()
    assert "## Pipelines on the same queries" in report and "Best pipeline by ndcg@10 on test: " in report
    assert report.index("## Pipelines") < report.index("## Metrics against")
    summary = json.loads((out / "metrics.json").read_text())
    assert [row["name"] for row in summary["systems"]] == names and summary["best"] == best.name
    assert summary["fusion"][names[3]]["chosen_on"] == "dev" and summary["verdict"].startswith("Best pipeline")
    assert (out / "runs" / "systems" / "bm25.trec").is_file()


def test_a_dataset_without_dev_split_fuses_with_equal_weights_and_says_so(
        embedder_adapter: Path, tmp_path: Path, base_path: str) -> None:
    from conftest import DISTRACTORS, TOPICS, write_beir
    from retrieval_lora.pipeline import Candidate, evaluate_candidate

    corpus = {doc_id: ("", text) for _, _, doc_id, text in TOPICS} | {f"x{i}": ("", t) for i, t in enumerate(DISTRACTORS)}
    rows = [(q, d, 1) for q, _, d, _ in TOPICS]
    folder = write_beir(tmp_path / "nodev", corpus, {q: t for q, t, _, _ in TOPICS}, {"train": rows[:8], "test": rows[8:]})
    comparison = evaluate_candidate(Candidate("embedder", embedder_adapter, base_path, 32), load_dataset(str(folder)),
                                    EvaluationConfig(top_k=10, fusion="convex"), DataConfig(cache_dir=""), "ndcg@10",
                                    show_progress=False)
    choices = list(comparison.fusion.values())
    assert len(choices) == 2 and all(c.weights == (0.5, 0.5) and c.chosen_on is None for c in choices)
    assert all("the dataset has no 'dev' split" in c.reason for c in choices)


def test_a_reranker_is_measured_over_every_first_stage_against_the_frozen_reranker(
        embedder_adapter: Path, tiny_beir: Path, base_path: str, tmp_path: Path) -> None:
    from test_evaluation import _save_random_adapter
    from retrieval_lora.pipeline import Candidate, decide, evaluate_candidate
    from retrieval_lora.gate import GatePolicy

    reranker = _save_random_adapter("reranker", base_path, tmp_path / "reranker")
    dataset = load_dataset(str(tiny_beir))
    evaluation = EvaluationConfig(top_k=10, rerank_top_k=5, fusion="convex", first_stage_adapter=str(embedder_adapter),
                                  guard_data=str(tiny_beir), guard_split="dev")
    comparison = evaluate_candidate(Candidate("reranker", reranker, base_path, 32), dataset, evaluation,
                                    DataConfig(cache_dir=""), "ndcg@10", show_progress=False)
    stages = list(dict.fromkeys(row.first_stage for row in comparison.systems))
    assert stages[:2] == ["frozen base embedder", "BM25"] and stages[3] == "embedder adapter"
    assert stages[2].startswith("BM25 + frozen base embedder (convex, w_bm25 = ")  # chosen on the 2 dev queries
    assert stages[4].startswith("BM25 + embedder adapter (convex, w_bm25 = ") and len(stages) == 5
    for stage in stages:  # each first stage alone, under the frozen reranker, under the adapter
        assert [row.role for row in comparison.systems if row.first_stage == stage] == [
            "first-stage", "frozen-reranker", "adapter-reranker"]
        assert comparison.tests[f"frozen base reranker over {stage}"].candidate_name == f"adapter over {stage}"
        if stage != "BM25":  # reranking a first stage against that stage alone; BM25 alone is the gate's bm25 row
            assert comparison.tests[f"{stage} (no reranking)"].candidate_name == f"adapter over {stage}"
    assert comparison.tests["BM25 (no reranking)"].candidate_name == "adapter over frozen base embedder"
    hybrids = {row.name: row.metrics["ndcg@10"] for row in comparison.systems if row.first_stage == stages[2]
               and row.role in ("first-stage", "frozen-reranker")}  # the hybrid a user could run instead
    assert comparison.roles == {"bm25": "BM25 (no reranking)", "hybrid": max(hybrids, key=hybrids.get)}
    assert comparison.paired.baseline_name in ("first stage alone (no reranking)", "frozen base reranker")
    guard = comparison.guards["tiny"]
    assert guard.baseline_name == "frozen base reranker" and guard.split == "dev"
    decision = decide(comparison, GatePolicy(must_beat="bm25,hybrid", guard_max_drop=1.0))
    for start in ("against BM25 (BM25 (no reranking) vs adapter over frozen base embedder): ",
                  f"against the BM25 + frozen base hybrid ({comparison.roles['hybrid']} vs adapter over ",
                  "on the guard dataset tiny (dev, 2 queries) ndcg@10 went from "):
        assert any(reason.startswith(start) for reason in decision.reasons), start
