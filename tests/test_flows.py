"""The Prefect flows, run for real on tiny data against Prefect's test server.

One flow run end to end (sharded corpus encoding, mining, training, evaluation, gate,
registry, artifacts) is shared by the tests that inspect it; reruns then show the caching,
and a second work folder shows a run killed during training resuming without mining again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from prefect.artifacts import Artifact

from conftest import SENTENCES, write_learnable
from flows.deploy import build_deployment
from flows.encode import encode_corpus, make_task_runner
from flows.specialize import parameters_from_args, specialize
from retrieval_lora.data import load_beir
from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached
from retrieval_lora.encoding import encode_texts
from retrieval_lora.models import load_base
from retrieval_lora.registry import Registry
from retrieval_lora.sharding import corpus_texts
from retrieval_lora.training import last_complete_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

LENIENT_GATE = {"min_gain": 0.0, "require_significance": False, "max_regressed_share": 1.0}
STRICT_GATE = {"min_gain": 0.99}


def test_cli_flags_and_config_file_become_flow_parameters(tmp_path: Path) -> None:
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 2}, "gate": {"min_gain": 0.01}, "publish": {"name": "docs"}}))
    parameters = parameters_from_args(["--config", str(config), "--data", "corpus/", "--no-mining", "--name", "x"])
    assert parameters == {"train": {"epochs": 2, "mining": False}, "data": {"path": "corpus/"},
                          "gate": {"min_gain": 0.01}, "publish": {"name": "x"}}
    validated = specialize.validate_parameters(parameters)  # what Prefect does with a UI form or a deployment
    assert validated["train"].epochs == 2 and not validated["train"].mining and validated["gate"].min_gain == 0.01
    assert validated["data"].path == "corpus/" and validated["publish"].name == "x"


def test_the_nightly_deployment_has_a_cron_schedule_and_valid_parameters() -> None:
    parameters = parameters_from_args(["--config", str(REPO / "flows" / "nightly.yaml")])
    deployment = build_deployment(parameters, name="nightly", cron="0 2 * * *")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.entrypoint == "flows.specialize.specialize"
    assert specialize.validate_parameters(deployment.parameters)["data"].path == "data/docs-beir"


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_learnable(tmp_path_factory.mktemp("flows") / "learnable")


def flow_parameters(data: Path, root: Path, **overrides) -> dict:
    train = dict(max_seq_length=32, batch_size=4, epochs=2, lr=5e-3, dev_split="", checkpoint_steps=100,
                 lora={"rank": 8, "alpha": 16})
    train.update(overrides.pop("train", {}))
    return dict(data={"path": str(data), "cache_dir": str(root / "embeddings")}, train=train,
                mining={"negatives": 1, "rank_start": 1, "rank_end": 7, "margin": 0.0,
                        "cache_dir": str(root / "embeddings"), "cache_dtype": "float32", "show_progress": False},
                evaluation={"split": "train", "top_k": 8}, gate=LENIENT_GATE,
                publish={"name": "learnable", "registry": str(root / "registry")}, workdir=str(root / "work"),
                **overrides)


@pytest.fixture(scope="module")
def first_run(prefect_api: str, learnable: Path):
    """One end-to-end run, with the corpus encoded in 2 shards for mining."""
    parameters = flow_parameters(learnable, learnable.parent, encode_shards=2)
    state = specialize(**parameters, return_state=True)
    return parameters, state.result(), state.state_details.flow_run_id


def test_flow_runs_end_to_end_and_promotes(first_run) -> None:
    parameters, outcome, _ = first_run
    assert outcome.status == "promoted", outcome.reasons
    assert outcome.steps == {"rows": "Completed", "train": "Completed", "evaluate": "Completed",
                             "publish": "Completed"}
    assert outcome.training == "trained"
    assert outcome.metrics["adapter"]["ndcg@10"] > outcome.metrics["baseline"]["ndcg@10"]
    registry = Registry(parameters["publish"]["registry"])
    promoted = registry.promoted("learnable")
    assert promoted is not None and promoted.spec == outcome.version == "learnable@1"
    assert promoted.decision()["passed"] and (promoted.report_dir / "report.md").is_file()
    assert (Path(outcome.report_dir) / "report.html").is_file()
    mining_stats = next(Path(parameters["workdir"], "rows").glob("*/stats.json"))
    assert yaml.safe_load(mining_stats.read_text())["cache"]["corpus"] == "hit"  # the shards' embeddings were used


def test_report_and_metrics_are_flow_artifacts(first_run) -> None:
    _, outcome, flow_run_id = first_run
    report = Artifact.get("specialize-report-learnable")
    table = Artifact.get("specialize-metrics-learnable")
    assert report is not None and table is not None
    assert report.flow_run_id == table.flow_run_id == flow_run_id
    assert report.type == "markdown" and "PROMOTED" in report.data and "Gate decision: PASSED" in report.data
    rows = yaml.safe_load(table.data)  # a JSON list of rows
    assert {row["metric"] for row in rows} == set(outcome.metrics["baseline"])


def test_rerun_on_unchanged_inputs_skips_training(first_run) -> None:
    parameters, first, _ = first_run
    again = specialize(**parameters)
    assert again.steps == {"rows": "Cached", "train": "Cached", "evaluate": "Cached", "publish": "Cached"}
    assert again.training.startswith("skipped: data and settings unchanged")
    assert (again.status, again.version, again.metrics) == (first.status, first.version, first.metrics)
    assert [v.version for v in Registry(parameters["publish"]["registry"]).versions("learnable")] == [1]  # no duplicate


def test_a_stricter_gate_rejects_without_retraining(first_run) -> None:
    from flows.specialize import run

    parameters, _, _ = first_run
    state = specialize(**{**parameters, "gate": STRICT_GATE}, return_state=True)
    assert state.is_failed() and state.name == "Rejected"  # a state a Prefect user can alert on
    outcome = run(**{**parameters, "gate": STRICT_GATE})
    assert outcome.status == "rejected" and outcome.steps["train"] == "Cached"
    assert any("gain is too small" in reason for reason in outcome.reasons)
    registry = Registry(parameters["publish"]["registry"])
    assert registry.promoted("learnable").version == 1 and outcome.version == "(not registered)"
    assert [v.version for v in registry.versions("learnable")] == [1]  # a rejected candidate is not registered
    assert registry.resolve("learnable@latest").version == 1  # so it can never be served, by name or @latest
    assert outcome.promoted_now == "learnable@1"


def test_changing_only_the_checkpoint_frequency_reuses_the_trained_adapter(first_run) -> None:
    from flows.specialize import run

    parameters, first, _ = first_run
    train = {**parameters["train"], "checkpoint_steps": 7, "gradient_checkpointing": True}
    outcome = run(**{**parameters, "train": train})
    assert outcome.steps["train"] == "Cached" and outcome.metrics["adapter"] == first.metrics["adapter"]


def test_a_challenger_that_loses_to_the_champion_is_not_promoted(first_run) -> None:
    from flows.specialize import run

    parameters, first, _ = first_run
    weak = {**parameters["train"], "lr": 1e-6, "epochs": 1}  # barely moves from the base; the champion is far ahead
    outcome = run(**{**parameters, "train": weak})
    assert outcome.status == "rejected" and outcome.metrics["champion"] == "learnable@1"
    assert any(r.startswith("against the champion learnable@1: the candidate is worse") for r in outcome.reasons)
    assert Registry(parameters["publish"]["registry"]).promoted("learnable").version == 1


def _wait_for_checkpoint(process: subprocess.Popen, work: Path, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_dir in work.glob("train/*"):
            checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
            if checkpoint is not None:
                return checkpoint
        if process.poll() is not None:
            pytest.fail(f"the flow ended (rc {process.returncode}) before its first checkpoint:\n"
                        f"{process.stdout.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail("no training checkpoint appeared in time")


def test_run_killed_during_training_resumes_without_mining_again(prefect_api: str, learnable: Path,
                                                                  tmp_path: Path) -> None:
    # 4 steps, a checkpoint after each: the kill lands while steps remain, even on a fast machine.
    parameters = flow_parameters(learnable, tmp_path, train={"checkpoint_steps": 1, "epochs": 2})
    config = tmp_path / "flow.yaml"
    config.write_text(yaml.safe_dump(parameters))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "flows.specialize", "--config", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(process, tmp_path / "work")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not list((tmp_path / "work").glob("train/*/adapter")), "the kill came too late: training had finished"
    mined = next((tmp_path / "work").glob("rows/*/stats.json"))
    mined_at = mined.stat().st_mtime_ns

    outcome = specialize(**parameters_from_args(["--config", str(config)]))
    assert outcome.steps["rows"] == "Cached" and outcome.steps["train"] == "Completed"
    assert outcome.training.startswith("resumed from checkpoint-")
    assert mined.stat().st_mtime_ns == mined_at  # the mining output was not rewritten
    assert outcome.status == "promoted"


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_sharded_encoding_equals_unsharded(prefect_api: str, learnable: Path, tmp_path: Path, runner: str) -> None:
    if runner == "dask":  # a small in-process Dask cluster: the runner's real code path, without worker start-up
        from prefect_dask import DaskTaskRunner

        task_runner = DaskTaskRunner(cluster_kwargs={"processes": False, "n_workers": 2, "threads_per_worker": 1})
    else:
        task_runner = make_task_runner("threads")
    encoded = encode_corpus.with_options(task_runner=task_runner)(
        data=str(learnable), max_seq_length=32, shards=3, batch_size=2, cache_dir=str(tmp_path / "cache"),
        cache_dtype="float32", workdir=str(tmp_path / "work"))
    assert encoded["shards"] == 3 and encoded["rows"] == len(SENTENCES)
    dataset = load_beir(learnable)
    model = load_base("embedder", max_seq_length=32)
    cache = EmbeddingCache(tmp_path / "cache", "float32")
    from_shards = encode_corpus_cached(model, dataset, cache, batch_size=2)
    assert from_shards.cache == "hit"
    unsharded = encode_texts(model, corpus_texts(dataset), batch_size=2, show_progress=False)
    assert np.array_equal(from_shards.vectors, unsharded)


def test_the_schedule_can_live_in_a_process_work_pool(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy_to_pool

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="retrieval-lora-test", type="process"), overwrite=True)
        parameters = parameters_from_args(["--config", str(REPO / "flows" / "nightly.yaml")])
        deployment_id = deploy_to_pool(parameters, name="nightly-pool", cron="0 2 * * *", pool="retrieval-lora-test")
        deployment = client.read_deployment(deployment_id)
    assert deployment.work_pool_name == "retrieval-lora-test" and deployment.entrypoint == "flows/specialize.py:specialize"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.parameters["data"]["path"] == "data/docs-beir"
