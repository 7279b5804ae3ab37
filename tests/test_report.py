"""Report: markdown and self-contained HTML with the metrics table, marks, decision, plot, regressions."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from retrieval_lora.evaluation import Comparison, compare_runs
from retrieval_lora.gate import decide
from retrieval_lora.report import PLOT_FILE, significance_mark, write_comparison_report, write_evaluation

N = 30
QRELS = {f"q{i}": {f"d{i}": 1} for i in range(N)}
DOCS = [f"d{i}" for i in range(N)]


def _run(rank_of: dict[int, int]) -> dict[str, dict[str, float]]:
    """Query i's relevant document at rank rank_of[i] (default 2) among all documents."""
    run = {}
    for i in range(N):
        ranking = [d for d in DOCS if d != f"d{i}"]
        ranking.insert(rank_of.get(i, 2) - 1, f"d{i}")
        run[f"q{i}"] = {doc: float(N - pos) for pos, doc in enumerate(ranking)}
    return run


@pytest.fixture(scope="module")
def comparison():
    # 25 queries move from rank 2 to 1; q3 drops to rank 9, q7 to rank 4 (the two regressions).
    candidate = _run({**{i: 1 for i in range(N) if i not in (3, 7, 11, 12, 13)}, 3: 9, 7: 4})
    texts = {f"q{i}": f"query number {i}" for i in range(N)}
    texts["q3"] = "<script>alert('x')</script> | pipes"
    return compare_runs(QRELS, _run({}), candidate, metrics=("ndcg@10", "mrr@10", "recall@10"), split="test",
                        baseline_name="frozen base embedder", candidate_name="adapter", query_texts=texts)


def test_significance_marks() -> None:
    assert significance_mark(0.1, 0.001, 0.05) == "▲"
    assert significance_mark(-0.1, 0.001, 0.05) == "▼"
    assert significance_mark(0.1, 0.2, 0.05) == "" and significance_mark(0.0, 0.0, 0.05) == ""


def test_markdown_report_has_table_marks_decision_plot_and_regressions(comparison, tmp_path: Path) -> None:
    decision = decide(comparison)
    files = write_comparison_report(tmp_path, comparison, decision, title="Adapter vs base", details={"seed": 1})
    text = files.markdown.read_text()
    assert text.startswith("# Adapter vs base\n")
    assert f"## Gate decision: {'PASSED' if decision.passed else 'FAILED'}" in text
    assert all(f"- {reason}" in text for reason in decision.reasons)
    ndcg = comparison.metrics["ndcg@10"]
    assert f"| ndcg@10 | {ndcg.baseline:.4f} | {ndcg.candidate:.4f} | {ndcg.delta:+.4f} ▲ |" in text
    assert "| recall@10 | 1.0000 | 1.0000 | +0.0000 | 1.0000 | 0 / 0 / 30 |" in text
    assert f"![per-query ndcg@10 deltas]({PLOT_FILE})" in text
    worst = text.split("## Worst regressions on ndcg@10")[1]
    assert worst.index("| q3 |") < worst.index("| q7 |")  # q3 dropped more
    assert "\\| pipes" in worst  # a pipe in a query does not break the table
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| seed | 1 |" in text


def test_html_report_is_self_contained_and_escaped(comparison, tmp_path: Path) -> None:
    html = write_comparison_report(tmp_path, comparison, decide(comparison)).html.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1])[:4] == b"\x89PNG"
    assert "<h2 class='PASSED'>Gate decision: PASSED</h2>" in html
    assert "<td>ndcg@10</td>" in html and "▲" in html


def test_no_regressions_is_said_in_words(tmp_path: Path) -> None:
    same = compare_runs(QRELS, _run({}), _run({}), metrics=("ndcg@10",))
    text = write_comparison_report(tmp_path, same).markdown.read_text()
    assert "No query scores lower under the candidate." in text and "Gate decision" not in text


def test_evaluation_folder_is_written_whole(comparison, tmp_path: Path) -> None:
    whole = Comparison("test", comparison.baseline_name, {m: r.baseline for m, r in comparison.metrics.items()},
                       {m: r.candidate for m, r in comparison.metrics.items()}, _run({}), _run({0: 1}), comparison,
                       {comparison.baseline_name: {}})
    target = tmp_path / "eval"
    target.mkdir()
    (target / "stale.txt").write_text("from an older evaluation")
    write_evaluation(target, whole, decide(comparison), extra_files={"manifest.json": {"kind": "evaluation"}})
    assert sorted(p.name for p in target.iterdir()) == [
        "comparison.json", "decision.json", "manifest.json", "metrics.json", PLOT_FILE, "report.html", "report.md",
        "runs"]
    metrics = json.loads((target / "metrics.json").read_text())
    assert metrics["wins_losses_ties"]["ndcg@10"] == [25, 2, 3] and metrics["stat_test"] == "student"
    assert (target / "runs" / "adapter.trec").read_text().startswith("q0 Q0 d0 1 ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
