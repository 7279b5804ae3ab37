"""`python -m retrieval_lora.train`: --help, argument errors, and a real end-to-end run on tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_lora.models import load_adapter, load_base
from retrieval_lora.train import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "retrieval_lora.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--task", "--data", "--base", "--qlora", "--lora-rank", "--lora-alpha", "--epochs", "--batch-size",
                 "--lr", "--output", "--seed", "--config", "--lora-target-modules", "--gate-alpha", "--eval-top-k",
                 "--exclude-self", "--cache-dir", "--strict-data", "--registry", "--fail-on-reject"):
        assert flag in out
    assert "(default: 16)" in out and "examples:" in out
    assert "\n  --alpha" not in out and "\n  --rank" not in out  # LoRA's and the gate's alpha are told apart


def test_bad_arguments_give_one_readable_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "retrieval_lora.train", "--task", "embedder", "--lora-rank", "0",
                             "--batch-size", "1", "--data", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "rank=0: must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "retrieval_lora.train", "--task", "embedder",
                             "--data", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_fails_in_about_a_second_before_any_heavy_import(tmp_path: Path, tiny_beir: Path) -> None:
    probe = ("import sys, time; from retrieval_lora.train import main; from retrieval_lora.errors import DataError\n"
             "for args in (['--data', sys.argv[1]], ['--data', sys.argv[2], '--dev-split', 'validation'],\n"
             "             ['--data', sys.argv[2], '--eval-split', 'tset']):\n"
             "    started = time.time()\n"
             "    try: main(args)\n"
             "    except DataError as exc: print(round(time.time() - started, 2), exc)\n"
             "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'faiss', 'ranx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "missing"), str(tiny_beir)], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout.splitlines()
    assert "does not exist" in out[0] and "'validation' not found" in out[1] and "'tset' not found" in out[2]
    assert all(float(line.split()[0]) < 2.0 for line in out[:3])
    assert out[3] == "[]"  # no model library was imported to find that out


def test_config_file_is_read_and_flags_override_it(tmp_path: Path, tiny_beir: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {tiny_beir}\ntrain:\n  task: embedder\n  lora:\n    rank: 0\n")
    with pytest.raises(Exception, match="rank=0"):
        main(["--config", str(config)])


@pytest.mark.slow
def test_end_to_end_embedder_run_writes_adapter_and_metrics(tiny_beir: Path, tmp_path: Path, base_path: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--task", "embedder", "--data", str(tiny_beir), "--output", str(tmp_path / "runs"),
                 "--epochs", "3", "--batch-size", "4", "--lora-rank", "4", "--eval-split", "train", "--max-seq-length", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "mrr@10" in printed and "Adapter written to" in printed
    run_dir = tmp_path / "runs" / "embedder"
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "retrieval_lora.json"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["adapter"]) == {"ndcg@10", "mrr@10", "recall@100", "map@100"}
    assert metrics["adapter"]["ndcg@10"] >= metrics["baseline"]["ndcg@10"]
    meta = json.loads((run_dir / "adapter" / "retrieval_lora.json").read_text())
    assert meta["task"] == "embedder" and meta["config"]["lora"]["rank"] == 4 and meta["dataset_fingerprint"]
    assert "Mined 1 negative(s)" in printed  # the embedder's default; its batch adds in-batch negatives
    model = load_base("embedder", base_path)
    load_adapter(model, run_dir / "adapter", "embedder")


@pytest.mark.slow
def test_end_to_end_reranker_run(tiny_beir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--task", "reranker", "--data", str(tiny_beir), "--output", str(tmp_path / "runs"),
                 "--epochs", "1", "--batch-size", "4", "--lora-rank", "4", "--max-seq-length", "64", "--eval-rerank-top-k", "5"])
    assert code == 0
    assert "Mined 4 negative(s)" in capsys.readouterr().out  # the reranker's default: its loss sees no other negatives
    metrics = json.loads((tmp_path / "runs" / "reranker" / "metrics.json").read_text())
    assert metrics["baseline_name"] in ("first stage alone (no reranking)", "frozen base reranker")
    assert (tmp_path / "runs" / "reranker" / "mining" / "stats.json").is_file()  # negatives were mined


def test_default_reranker_job_learns_the_tiny_learnable_set(tmp_path: Path) -> None:
    """`--task reranker` with the defaults (a zero head under the cosine prior on the bi-encoder base, its
    50-step budget) learns 8 code-name pairs: its loss falls and it ranks above the first stage and the
    frozen base reranker (8 queries are too few for the gate's significance test; the demo job passes it,
    evals/results/reranker_default.md)."""
    from conftest import write_learnable

    data = write_learnable(tmp_path / "learnable")
    code = main(["--task", "reranker", "--data", str(data), "--output", str(tmp_path / "runs"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    run = tmp_path / "runs" / "reranker"
    metrics = json.loads((run / "metrics.json").read_text())
    considered = metrics["baselines_considered"]
    adapter = metrics["adapter"]["ndcg@10"]
    assert adapter > considered["first stage alone (no reranking)"]["ndcg@10"] + 0.03
    assert adapter > considered["frozen base reranker"]["ndcg@10"]
    trained = json.loads((run / "adapter" / "retrieval_lora.json").read_text())
    assert trained["cosine_prior"] == {"scale": 20.0, "pooling": "mean"}
    # the budget: 1 step an epoch of 8 rows
    assert trained["metrics"]["steps"] == 50 and trained["metrics"]["training_loss"]["fell"]
