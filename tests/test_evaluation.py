"""Evaluation: hand-checked metrics, paired comparison, TREC runs, reranking, and the evaluate CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_lora.data import load_dataset
from retrieval_lora.errors import AdapterError, ConfigError, DataError, EvaluationError
from retrieval_lora.evaluate import EvaluateCommand, main as evaluate_main
from retrieval_lora.pipeline import EvaluationConfig
from retrieval_lora.evaluation import (
    compare_runs, compare_with_base, read_trec_run, rerank, score_run, search, write_trec_run,
)
from retrieval_lora.models import (
    METADATA_FILE, AdapterMetadata, LoraSettings, attach_lora, base_fingerprint, load_adapter, load_base,
    save_adapter, transformer_of,
)
from retrieval_lora.registry import Registry

# Two labelled queries plus one the run never answers.
#   q1: relevant d1 at rank 2             -> nDCG@10 1/log2(3) = 0.63093, RR 1/2, AP 1/2, recall 1
#   q2: relevant d2 at rank 1, d3 at 3    -> DCG 1 + 1/2 = 1.5, IDCG 1 + 1/log2(3) = 1.63093,
#                                            nDCG 0.91972, RR 1, AP (1 + 2/3)/2 = 0.83333, recall 1
#   q3: not in the run                    -> every metric 0
TOY_QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}}
TOY_RUN = {"q1": {"d5": 0.9, "d1": 0.8, "d6": 0.1}, "q2": {"d2": 0.9, "d4": 0.8, "d3": 0.7}}


def test_metrics_on_a_hand_checkable_run() -> None:
    scores = score_run(TOY_QRELS, TOY_RUN, ("ndcg@10", "mrr@10", "recall@100", "map@100", "recall@2"))
    assert scores["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.5 / (1 + 1 / math.log2(3))) / 3, abs=1e-6)
    assert scores["mrr@10"] == pytest.approx((0.5 + 1) / 3)
    assert scores["recall@100"] == pytest.approx(2 / 3)
    assert scores["recall@2"] == pytest.approx((1 + 0.5) / 3)
    assert scores["map@100"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 3)


def test_score_run_rejects_bad_input() -> None:
    with pytest.raises(EvaluationError, match="not in the qrels.*'q7'"):
        score_run(TOY_QRELS, {"q7": {"d1": 1.0}})
    with pytest.raises(EvaluationError, match="empty"):
        score_run(TOY_QRELS, {})
    with pytest.raises(ConfigError, match="ndgc"):
        score_run(TOY_QRELS, TOY_RUN, ("ndgc@10",))


def test_search_can_drop_a_querys_own_id() -> None:
    docs = np.eye(3, dtype=np.float32)
    queries = np.array([[1.0, 0.5, 0.0]], dtype=np.float32)
    assert list(search(["a", "b", "c"], docs, ["a"], queries, 2)["a"]) == ["a", "b"]
    assert list(search(["a", "b", "c"], docs, ["a"], queries, 2, exclude_self=True)["a"]) == ["b", "c"]


def test_compare_runs_counts_wins_losses_ties_and_worst_regressions() -> None:
    better = {"q1": {"d1": 0.9, "d5": 0.8}, "q2": {"d4": 0.9, "d2": 0.8, "d3": 0.7}, "q3": {"d9": 1.0}}
    paired = compare_runs(TOY_QRELS, TOY_RUN, better, metrics=("mrr@10", "ndcg@10"), split="toy",
                          query_texts={"q2": "second query"})
    mrr = paired.metrics["mrr@10"]
    assert (mrr.baseline, mrr.candidate) == (pytest.approx(0.5), pytest.approx((1 + 0.5 + 1) / 3))
    assert (mrr.wins, mrr.losses, mrr.ties) == (2, 1, 0)  # q1 and q3 better, q2 worse
    assert paired.per_query["mrr@10"]["q2"] == (1.0, 0.5)
    worst = paired.worst_regressions("mrr@10")
    assert [(w.query_id, w.text, w.delta) for w in worst] == [("q2", "second query", -0.5)]
    assert paired.regressed_share("mrr@10") == pytest.approx(1 / 3)
    assert 0 < mrr.p_value <= 1
    same = compare_runs(TOY_QRELS, TOY_RUN, TOY_RUN, metrics=("ndcg@10",))
    assert same.metrics["ndcg@10"].p_value == 1.0 and same.metrics["ndcg@10"].ties == 3
    with pytest.raises(ConfigError, match="stat_test='tukey'"):
        compare_runs(TOY_QRELS, TOY_RUN, better, stat_test="tukey")


def test_trec_runs_round_trip_and_bad_files_name_the_line(tmp_path: Path, tiny_beir: Path) -> None:
    path = write_trec_run(TOY_RUN, tmp_path / "run.trec")
    assert path.read_text().splitlines()[0] == "q1 Q0 d5 1 0.9 retrieval-lora"
    assert read_trec_run(path) == TOY_RUN
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 d2 0.4\n")
    with pytest.raises(EvaluationError, match=r"bad.trec:2: not a TREC run line"):
        read_trec_run(bad)
    dataset = load_dataset(str(tiny_beir))
    foreign = write_trec_run({"q1": {"d1": 1.0, "zz": 0.5}, "nq7": {"d2": 1.0}}, tmp_path / "foreign.trec")
    with pytest.raises(EvaluationError, match=r"1 query id\(s\) not in .*queries.jsonl \(e.g. 'nq7'\); "
                                              r"1 document id\(s\) not in .*corpus.jsonl \(e.g. 'zz'\)"):
        read_trec_run(foreign, dataset)
    with pytest.raises(EvaluationError, match="does not exist"):
        read_trec_run(tmp_path / "missing.trec")


def test_ties_and_near_ties_score_the_same_in_memory_and_from_the_saved_run(tmp_path: Path) -> None:
    # d1 (relevant) ties with d0 and d2; d4 (relevant) trails d3 by less than the old 6-decimal rounding
    run = {"q1": {"d1": 0.5, "d0": 0.5, "d2": 0.5}, "q2": {"d3": 0.70000004, "d4": 0.70000001, "d5": 0.1}}
    qrels = {"q1": {"d1": 1}, "q2": {"d4": 1}}
    in_memory = score_run(qrels, run)
    assert in_memory["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # d1 second: ties broken by id
    reordered = {"q1": dict(reversed(run["q1"].items())), "q2": dict(reversed(run["q2"].items()))}
    assert score_run(qrels, reordered) == in_memory
    assert score_run(qrels, read_trec_run(write_trec_run(run, tmp_path / "run.trec"))) == in_memory


# ---- with the real model ------------------------------------------------------------------

def _save_random_adapter(task: str, base_path: str, folder: Path) -> Path:
    model = load_base(task, base_path, max_seq_length=32)
    attach_lora(model, task, LoraSettings(rank=2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in transformer_of(model).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return save_adapter(model, folder, AdapterMetadata(task, base_path, base_fingerprint(model)))


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, base_path: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_adapters")
    return {task: _save_random_adapter(task, base_path, root / task) for task in ("embedder", "reranker")}


@pytest.fixture(scope="session")
def embedder(adapter_dirs: dict[str, Path], base_path: str):
    model = load_base("embedder", base_path, max_seq_length=32)
    load_adapter(model, adapter_dirs["embedder"], "embedder")
    return model


@pytest.fixture(scope="session")
def reranker(adapter_dirs: dict[str, Path], base_path: str):
    model = load_base("reranker", base_path, max_seq_length=32)
    load_adapter(model, adapter_dirs["reranker"], "reranker")
    return model


def test_embedder_comparison_uses_the_frozen_base_as_baseline(embedder, tiny_beir: Path, base_path: str) -> None:
    dataset = load_dataset(str(tiny_beir))
    comparison = compare_with_base("embedder", embedder, dataset, "train", base=base_path, k=10, show_progress=False)
    frozen = load_base("embedder", base_path, max_seq_length=32)
    from retrieval_lora.evaluation import retrieve

    frozen_run = retrieve(frozen, dataset, "train", k=10, show_progress=False)
    assert comparison.baseline == score_run(dataset.split_qrels("train"), frozen_run)
    paired = comparison.paired
    assert paired.baseline_name == "frozen base embedder" and paired.num_queries == 8
    assert set(paired.metrics) == {"ndcg@10", "mrr@10", "recall@100", "map@100"}
    assert comparison.adapter == {m: r.candidate for m, r in paired.metrics.items()}
    assert paired.query_texts["q1"] == "which animal has a trunk"
    with pytest.raises(DataError, match="split 'validation' not found.*available splits: dev, test, train"):
        compare_with_base("embedder", embedder, dataset, "validation", base=base_path)


def test_reranker_baseline_is_the_better_of_first_stage_and_frozen_reranker(reranker, tiny_beir: Path,
                                                                            base_path: str, tmp_path: Path) -> None:
    dataset = load_dataset(str(tiny_beir))
    # A user first stage: every query gets all documents, its relevant one ranked 5th.
    qrels = dataset.split_qrels("train")
    first = {}
    for qid, relevant in qrels.items():
        others = [d for d in sorted(dataset.corpus) if d not in relevant]
        ranking = others[:4] + list(relevant) + others[4:]
        first[qid] = {doc_id: float(len(ranking) - rank) for rank, doc_id in enumerate(ranking)}
    run_file = write_trec_run(first, tmp_path / "first.trec")
    first_stage = read_trec_run(run_file, dataset)
    comparison = compare_with_base("reranker", reranker, dataset, "train", base=base_path, rerank_k=6,
                                   first_stage=first_stage, show_progress=False)
    assert set(comparison.baselines) == {"first stage alone (no reranking)", "frozen base reranker"}
    best = max(comparison.baselines, key=lambda name: comparison.baselines[name]["ndcg@10"])
    assert comparison.baseline_name == best and comparison.baseline == comparison.baselines[best]
    reranked = rerank(reranker, dataset, first_stage, k=6, show_progress=False)
    for qid, ranking in first_stage.items():  # documents below k keep the first stage's order, last
        order = sorted(ranking, key=ranking.get, reverse=True)
        new_order = sorted(reranked[qid], key=reranked[qid].get, reverse=True)
        assert set(new_order[:6]) == set(order[:6]) and new_order[6:] == order[6:]
    assert comparison.adapter_run.keys() == reranked.keys()
    for qid, ranking in reranked.items():  # the adapter run is scored with the adapter merged: equal to rounding
        assert comparison.adapter_run[qid] == pytest.approx(ranking, abs=1e-5)
    with pytest.raises(EvaluationError, match="first-stage run: 1 document id"):
        rerank(reranker, dataset, {"q1": {"nope": 1.0}}, k=2)


def test_evaluate_cli_writes_a_full_report_folder(adapter_dirs: dict[str, Path], tiny_beir: Path, base_path: str,
                                                  tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    code = evaluate_main(["--data", str(tiny_beir), "--split", "train", "--adapter", str(adapter_dirs["embedder"]),
                          "--base", base_path, "--max-seq-length", "32", "--top-k", "10", "--output", str(out),
                          "--gate-min-gain", "0.5", "--fail-on-reject"])
    assert code == 3  # a random adapter does not gain half a point of nDCG@10
    printed = capsys.readouterr().out
    assert "gate: FAILED" in printed and "report.html" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.json", "config.yaml", "decision.json", "manifest.json", "metrics.json", "per_query_deltas.png",
        "report.html", "report.md", "runs"]
    decision = json.loads((out / "decision.json").read_text())
    assert decision["passed"] is False and decision["policy"]["min_gain"] == 0.5
    assert sorted(json.loads((out / "comparison.json").read_text())["per_query"]["ndcg@10"]) == sorted(
        f"q{i}" for i in range(1, 9))
    # the saved config reproduces the evaluation
    again = tmp_path / "again"
    assert evaluate_main(["--config", str(out / "config.yaml"), "--output", str(again), "--no-save-runs"]) == 3
    assert json.loads((again / "decision.json").read_text())["reasons"] == decision["reasons"]


def test_base_alone_then_its_saved_run_as_the_baseline(adapter_dirs: dict[str, Path], tiny_beir: Path,
                                                       base_path: str, tmp_path: Path) -> None:
    out, cache = tmp_path / "base", tmp_path / "cache"
    common = ["--data", str(tiny_beir), "--split", "train", "--base", base_path, "--max-seq-length", "32",
              "--cache-dir", str(cache), "--cache", "--metrics", "ndcg@10,recall@5"]
    assert evaluate_main(common + ["--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_queries"] == 8 and set(metrics["metrics"]) == {"ndcg@10", "recall@5"}
    assert "| ndcg@10 |" in (out / "report.md").read_text() and (out / "runs" / "base.trec").is_file()
    assert len(list(cache.glob("*.npy"))) == 1  # the base corpus, cached
    # The saved base run stands in for the frozen base: same baseline, no second base encoding.
    adapter = ["--adapter", str(adapter_dirs["embedder"]), "--no-save-runs"]
    assert evaluate_main(common + adapter + ["--output", str(tmp_path / "a"), "--baseline-run",
                                            str(out / "runs" / "base.trec"), "--baseline-name", "saved base"]) == 0
    registry = Registry(tmp_path / "reg")
    registry.promote("tiny", registry.register("tiny", adapter_dirs["embedder"]).version, force=True)  # no gate ran
    assert evaluate_main(common + ["--adapter", "tiny", "--registry", str(registry.root), "--no-save-runs",
                                   "--output", str(tmp_path / "b")]) == 0  # the promoted version, from the registry
    saved, recomputed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    assert saved["baseline_name"] == "saved base" and recomputed["baseline_name"] == "frozen base embedder"
    assert saved["baseline"] == pytest.approx(recomputed["baseline"])
    assert saved["baseline"] == pytest.approx(metrics["metrics"])
    assert saved["adapter"] == recomputed["adapter"]  # the second adapter encoding came from the cache


def test_bad_input_gives_clear_errors(adapter_dirs: dict[str, Path], tiny_beir: Path, base_path: str,
                                      tmp_path: Path) -> None:
    common = ["--data", str(tiny_beir), "--base", base_path, "--max-seq-length", "32", "--output", str(tmp_path / "x")]
    embedder = ["--adapter", str(adapter_dirs["embedder"])]
    with pytest.raises(DataError, match="split 'validation' not found"):
        evaluate_main(common + embedder + ["--split", "validation"])
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter_dirs["embedder"], foreign)
    meta = json.loads((foreign / METADATA_FILE).read_text())
    (foreign / METADATA_FILE).write_text(json.dumps({**meta, "base_fingerprint": "0" * 16, "base_model": "other/base"}))
    with pytest.raises(AdapterError, match="trained on base 'other/base'.*load the base it was trained on"):
        evaluate_main(common + ["--adapter", str(foreign)])
    with pytest.raises(AdapterError, match="trained for task 'embedder', not 'reranker'"):
        evaluate_main(common + embedder + ["--task", "reranker"])
    run_file = write_trec_run({"q11": {"d11": 1.0, "zzz": 0.5}}, tmp_path / "r.trec")
    with pytest.raises(EvaluationError, match="1 document id.*'zzz'"):
        evaluate_main(common + ["--task", "reranker", "--first-stage", str(run_file)])
    with pytest.raises(ConfigError, match="primary_metric 'ndcg@10' is not among the evaluation metrics"):
        EvaluateCommand(evaluation=EvaluationConfig(metrics="mrr@10"))
    with pytest.raises(Exception, match="not a folder, and not a registry entry"):
        evaluate_main(common + ["--adapter", "nothing-here", "--registry", str(tmp_path / "reg")])


def test_base_reranker_alone_reranks_a_user_run_file(tiny_beir: Path, base_path: str, tmp_path: Path) -> None:
    dataset = load_dataset(str(tiny_beir))
    first = {qid: {doc_id: -float(rank) for rank, doc_id in enumerate(sorted(dataset.corpus))}
             for qid in dataset.split_qrels("test")}
    run_file = write_trec_run(first, tmp_path / "first.trec")
    out = tmp_path / "r"
    assert evaluate_main(["--task", "reranker", "--data", str(tiny_beir), "--base", base_path, "--max-seq-length", "32",
                          "--first-stage", str(run_file), "--rerank-top-k", "5", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["system"] == "frozen base reranker" and set(metrics["metrics"]) == {"ndcg@10", "mrr@10", "recall@100", "map@100"}
    reranked = read_trec_run(tmp_path / "r" / "runs" / "base.trec")
    for qid in first:  # only the top 5 were rescored; the rest keep the file's order
        assert list(sorted(reranked[qid], key=reranked[qid].get, reverse=True))[5:] == sorted(dataset.corpus)[5:]


def test_queries_that_are_documents_warn_unless_excluded(tmp_path: Path, base_path: str) -> None:
    from conftest import write_beir
    from retrieval_lora.pipeline import Candidate, DataConfig, EvaluationConfig, evaluate_candidate

    texts = {f"a{i}": f"argument number {i} about topic {i % 3}" for i in range(12)}
    # ArguAna-style: every query is also a document of the corpus, under the same id
    folder = write_beir(tmp_path / "arg", {k: ("", v) for k, v in texts.items()}, texts,
                        {"test": [(f"a{i}", f"a{(i + 1) % 12}", 1) for i in range(12)]})
    adapter = _save_random_adapter("embedder", base_path, tmp_path / "adapter")
    dataset = load_dataset(str(folder))
    candidate = Candidate("embedder", adapter, base_path, 32)
    with pytest.warns(UserWarning, match=r"12 of 12 queries retrieve a document with their own id.*--exclude-self"):
        evaluate_candidate(candidate, dataset, EvaluationConfig(top_k=5), DataConfig(), "ndcg@10", show_progress=False)
    comparison = evaluate_candidate(candidate, dataset, EvaluationConfig(top_k=5), DataConfig(exclude_self=True),
                                    "ndcg@10", show_progress=False)
    assert not any(qid in ranking for qid, ranking in comparison.adapter_run.items())
