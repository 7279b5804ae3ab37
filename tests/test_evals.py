"""The evals/ harness and the benchmark scripts over it, without running a benchmark.

Every script's skip path (no datasets -> exit 0 with a message, nothing written); one real
child process of run_isolated (spec in, JSON and its own memory figures out); the results
writer; and the committed tables, rewritten from the committed JSON by today's scripts, are
byte for byte the committed ones (so a refactor of evals/ cannot move a published figure).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT / "evals"
RESULTS = EVALS / "results"
sys.path.insert(0, str(EVALS))

import harness  # noqa: E402

SHARED = {"harness.py", "recipes.py"}  # the modules the scripts share
NOT_YET_ON_HARNESS = {"bench_short_rows.py"}  # written elsewhere; joins SCRIPTS once it uses harness
SCRIPTS = sorted(p.name for p in EVALS.glob("*.py") if p.name not in SHARED | NOT_YET_ON_HARNESS)
REQUIRED_FLAGS = {"bench_reranker_recipes.py": ["--name", "smoke"], "bench_reranker_default.py": ["--dataset", "scifact", "--name", "smoke"]}


def _results_state() -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in RESULTS.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_skips_without_its_dataset(script: str, tmp_path: Path) -> None:
    before = _results_state()
    env = {**os.environ, harness.DATASETS_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, str(EVALS / script), *REQUIRED_FLAGS.get(script, [])], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("skipped: dataset folder ") and str(tmp_path) in done.stdout
    assert _results_state() == before
    assert not any(tmp_path.iterdir())


def test_no_script_imports_another() -> None:
    local = {p.stem for p in EVALS.glob("*.py")}
    for script in SCRIPTS:
        tree = ast.parse((EVALS / script).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert imported & local <= {"harness", "recipes"}, script


def test_dataset_or_skip(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(harness.DATASETS_ENV, str(tmp_path))
    assert harness.datasets_root() == tmp_path
    with pytest.raises(SystemExit) as stop:
        harness.dataset_or_skip("scifact")
    assert stop.value.code == 0
    assert f"skipped: dataset folder {tmp_path / 'scifact'} not found" in capsys.readouterr().out
    (tmp_path / "scifact").mkdir()
    (tmp_path / "scifact" / "corpus.jsonl").write_text("")
    assert harness.dataset_or_skip("scifact") == tmp_path / "scifact"
    assert harness.dataset_or_skip("scifact", root=tmp_path) == tmp_path / "scifact"


@dataclasses.dataclass
class ProbeSpec:
    megabytes: int
    label: str
    where: Path
    nested: dict


def probe_child(spec) -> dict:
    """run_isolated's child in the test below: touch `megabytes` of memory, report the probes."""
    anon = harness.AnonPeak()
    block = b"x" * (spec.megabytes << 20)
    peak, anon_peak = harness.peak_rss_mb(), anon.reset()  # a window ends with one last sample
    del block
    harness.reset_peak()
    return {"echo": [spec.label, spec.where, spec.nested], "pid": os.getpid(), "peak_rss_mb": peak,
            "peak_after_reset_mb": harness.peak_rss_mb(), "anon_peak_mb": anon_peak,
            "anon_after_reset_mb": anon.stop(),
            "offline": os.environ["HF_HUB_OFFLINE"], "cwd": os.getcwd()}


def failing_child(spec) -> dict:
    raise ValueError(f"bad spec {spec.label}")


def test_run_isolated_returns_the_childs_json_and_own_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ballast = b"p" * (256 << 20)  # the parent's peak must not count in the child's
    spec = ProbeSpec(megabytes=48, label="tiny", where=tmp_path / "x", nested={"a": [1, 2.5, None]})
    child = harness.run_isolated(probe_child, spec)
    del ballast
    assert child["echo"] == ["tiny", str(tmp_path / "x"), {"a": [1, 2.5, None]}]
    assert child["pid"] != os.getpid() and child["cwd"] == str(tmp_path) and child["offline"] == "1"
    assert 48 <= child["peak_rss_mb"] < 256
    assert child["peak_after_reset_mb"] < child["peak_rss_mb"] - 40
    assert child["anon_peak_mb"] >= 40 > child["anon_after_reset_mb"]


def test_run_isolated_failure_raises_with_exit_status(capfd) -> None:
    with pytest.raises(harness.ChildFailed) as failed:
        harness.run_isolated(failing_child, {"label": "L7"})
    assert failed.value.returncode == 1 and "failing_child failed in its own process (exit 1)" in str(failed.value)
    assert "ValueError: bad spec L7" in capfd.readouterr().err  # the child's traceback, on this process's stderr


def test_results_writer_replaces_a_row_by_key(tmp_path: Path) -> None:
    rows = [{"size": "s", "variant": "lora", "peak": 1}, {"size": "s", "variant": "qlora", "peak": 2}]
    order = ("qlora", "lora").index
    rows = harness.replace_row(rows, {"size": "s", "variant": "lora", "peak": 3}, ("size", "variant"),
                               lambda r: order(r["variant"]))
    assert rows == [{"size": "s", "variant": "qlora", "peak": 2}, {"size": "s", "variant": "lora", "peak": 3}]
    assert harness.replace_row(rows, {"variant": "new"}, "variant")[-1] == {"variant": "new"}
    path = tmp_path / "out" / "bench_x"
    assert harness.read_results(path) == {}
    command = harness.command_line("bench_x.py", ["--name", "two words"])
    harness.write_results(path, {"rows": rows, "command": command}, f"# table\n\n    {command}\n")
    assert harness.read_results(path)["rows"] == rows
    assert harness.read_results(path.with_suffix(".json")) == harness.read_results(path)
    assert (tmp_path / "out" / "bench_x.json").read_text().endswith("}\n")
    assert (tmp_path / "out" / "bench_x.md").read_text() == "# table\n\n    python evals/bench_x.py --name 'two words'\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_x.json", "bench_x.md"]  # no temp left


# ---- the committed results are what the scripts write ------------------------------------------
def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _step_time(name: str) -> str:
    module = importlib.import_module("bench_step_time")
    argv = (RESULTS / name).read_text().splitlines()[4].split()[2:]  # the command the table names
    report = _load(name.replace(".md", ".json"))
    return module._markdown(report["dataset"], report["variants"], module.parse(argv),
                            harness.command_line("bench_step_time.py", argv))


def _serving(name: str) -> str:
    meta = _load(name.replace(".md", ".json"))
    return importlib.import_module("bench_serving")._markdown(meta.pop("results"), meta)


def _downstream(name: str) -> str:
    report = _load(name.replace(".md", ".json"))
    return importlib.import_module("bench_mining_downstream")._markdown(report, argparse.Namespace(**report["settings"]))


TABLES = {  # committed table -> how today's script writes it from the committed JSON
    "training_scifact.md": lambda n: importlib.import_module("bench_training")._markdown(_load("training_scifact.json")),
    "training_nfcorpus.md": lambda n: importlib.import_module("bench_training")._markdown(_load("training_nfcorpus.json")),
    "memory_scaling.md": lambda n: importlib.import_module("bench_memory_scaling")._markdown(_load("memory_scaling.json")),
    "mining_scifact.md": lambda n: importlib.import_module("bench_mining").markdown(_load("mining_scifact.json")),
    "mining_nfcorpus.md": lambda n: importlib.import_module("bench_mining").markdown(_load("mining_nfcorpus.json")),
    "reranker_recipes_scifact.md": lambda n: importlib.import_module("bench_reranker_recipes")._markdown(
        _load("reranker_recipes_scifact.json")["probes"], "scifact"),
    "reranker_recipes_nfcorpus.md": lambda n: importlib.import_module("bench_reranker_recipes")._markdown(
        _load("reranker_recipes_nfcorpus.json")["probes"], "nfcorpus"),
    "scifact_evaluation.md": lambda n: importlib.import_module("evaluate_scifact")._summary_markdown(
        _load("scifact_evaluation.json")),
    "serving.md": _serving,
    "serving_cpu_load.md": _serving,
    "serving_threads2.md": _serving,
    "step_time_nfcorpus.md": _step_time,
    "mining_downstream_scifact.md": _downstream,
    "task_runners.md": lambda n: importlib.import_module("bench_task_runners")._markdown(_load("task_runners.json")),
    "baselines_scifact.md": lambda n: importlib.import_module("bench_baselines").markdown(_load("baselines_scifact.json")),
    "baselines_nfcorpus.md": lambda n: importlib.import_module("bench_baselines").markdown(_load("baselines_nfcorpus.json")),
    "baselines_scifact_reranker.md": lambda n: importlib.import_module("bench_baselines").markdown(
        _load("baselines_scifact_reranker.json")),
    "baselines_nfcorpus_reranker.md": lambda n: importlib.import_module("bench_baselines").markdown(
        _load("baselines_nfcorpus_reranker.json")),
    "baselines_nfcorpus_reranker_rows2000.md": lambda n: importlib.import_module("bench_baselines").markdown(
        _load("baselines_nfcorpus_reranker_rows2000.json")),
    "reranker_default.md": lambda n: importlib.import_module("bench_reranker_default")._markdown(
        _load("reranker_default.json")["rows"]),
    "pseudo_queries.md": lambda n: importlib.import_module("bench_pseudo").markdown(_load("pseudo_queries.json")["rows"]),
    "rerank_headroom.md": lambda n: importlib.import_module("rerank_headroom").markdown(_load("rerank_headroom.json")),
}
HAND_WRITTEN = {"mining_scifact.md": "Note: ours-cold was measured by a first invocation"}  # added after the run


@pytest.mark.parametrize("name", sorted(TABLES))
def test_committed_table_is_what_the_script_writes(name: str) -> None:
    committed = (RESULTS / name).read_text()
    if name in HAND_WRITTEN:
        lines = committed.splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith(HAND_WRITTEN[name]))
        committed = "".join(lines[:at] + lines[at + 2:])  # the paragraph and its blank line
    assert TABLES[name](name) == committed
