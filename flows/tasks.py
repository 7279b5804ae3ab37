"""The steps of the `specialize` flow, one Prefect task each, each a thin call into retrieval_lora.

Tasks take paths, fingerprints and config dataclasses, never models or datasets: Prefect
hashes and persists task inputs and outputs, and a model object would be unhashable (which
silently disables caching) and unpicklable across workers. Each task reloads what it needs
from disk. Cached steps persist their output under `<workdir>/prefect-results` (see
`flows.caching`), keyed by the `key` argument the flow computes from fingerprints: small JSON
dicts of paths and numbers, except the evaluation, whose `Comparison` (plain data: runs and
scores) is pickled because the gate and the report both need it whole.

Retries cover failures that can pass (a dataset folder being rewritten while read, a registry
lock held by another process, a training step that fails part-way, which resumes from its
last checkpoint on the retry); a wrong setting (`ConfigError`) fails at once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypedDict

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.caching import key_parameter
from retrieval_lora import pipeline
from retrieval_lora.data import dataset_fingerprint, load_pairs
from retrieval_lora.errors import ConfigError, DataError
from retrieval_lora.evaluation import Comparison
from retrieval_lora.gate import GateDecision, GatePolicy
from retrieval_lora.mining import MiningConfig
from retrieval_lora.pipeline import DataConfig, EvaluationConfig, PublishConfig
from retrieval_lora.training import ProgressLog, TrainConfig, json_ready, last_complete_checkpoint

PERSISTED = dict(persist_result=True, result_serializer="json")


def not_a_setting_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry unless the failure is a bad setting (a retry cannot fix that)."""
    try:
        state.result()
    except ConfigError:
        return False
    except BaseException:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


class DataRef(TypedDict):
    path: str
    fingerprint: str
    documents: int
    splits: list[str]


class RowsRef(TypedDict):
    path: str
    fingerprint: str
    rows: int
    mined: bool
    stats: dict[str, Any]


class TrainedRef(TypedDict):
    run_dir: str
    adapter_dir: str
    train_rows: int
    resumed_from: str | None
    best_checkpoint: str | None


def load_checked(data: DataConfig, path: str, fingerprint: str):
    """The dataset at `path`, refusing one that changed since the flow fingerprinted it."""
    dataset = pipeline.load_data(dataclasses.replace(data, path=path))
    now = dataset_fingerprint(dataset)
    if now != fingerprint:
        raise DataError(f"dataset {path} changed while the flow ran (fingerprint {fingerprint} -> {now}); "
                        "run the flow again once the folder is no longer being written")
    return dataset


@task(name="load-data", retries=2, retry_delay_seconds=30, retry_condition_fn=not_a_setting_error)
def load_data(data: DataConfig, train: TrainConfig | None = None, evaluation: EvaluationConfig | None = None) -> DataRef:
    """Load and validate the dataset (with `train` and `evaluation`: every split the run reads must
    exist) and fingerprint it.

    Never cached: the fingerprint is what tells later steps whether the data changed.
    """
    dataset = pipeline.load_data(data)
    if train is not None and evaluation is not None:
        pipeline.check_splits(dataset, train, evaluation)
    return DataRef(path=str(Path(dataset.root).resolve()), fingerprint=dataset_fingerprint(dataset),
                   documents=len(dataset.corpus), splits=list(dataset.splits))


@task(name="training-rows", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("rows"), **PERSISTED)
def training_rows(key: str, data: DataConfig, data_path: str, data_fingerprint: str, train: TrainConfig,
                  mining: MiningConfig | None, out_dir: str) -> RowsRef:
    """`pipeline.build_rows` into `out_dir`: mined hard negatives, or the labelled pairs."""
    dataset = load_checked(data, data_path, data_fingerprint)
    rows = pipeline.build_rows(train, data, dataset, out_dir, mining=mining)
    return RowsRef(path=str(rows.path), fingerprint=rows.fingerprint, rows=len(rows.rows), mined=rows.mined,
                   stats=json.loads(json.dumps(rows.stats, default=str)))


@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("train"), **PERSISTED)
def train(key: str, data: DataConfig, data_path: str, data_fingerprint: str, rows: RowsRef, config: TrainConfig,
          run_dir: str) -> TrainedRef:
    """`pipeline.train` on the saved rows; resumes from `run_dir`'s last checkpoint if any.

    `run_dir` is named after `key`, so the checkpoints found there belong to a run with the
    same data, rows and settings: an interrupted run (crash, kill, retry) picks up from them.
    """
    dataset = load_checked(data, data_path, data_fingerprint)
    folder = Path(run_dir)
    resume = last_complete_checkpoint(folder / "checkpoints") is not None
    saved = pipeline.Rows(load_pairs(rows["path"]), Path(rows["path"]), rows["fingerprint"], rows["mined"])
    result = pipeline.train(dataclasses.replace(config, resume=resume), dataset, saved, folder,
                            callbacks=[ProgressLog(get_run_logger())])  # progress in the run's logs, not only a terminal
    return TrainedRef(run_dir=str(folder), adapter_dir=str(result.adapter_dir), train_rows=result.train_rows,
                      resumed_from=result.resumed_from, best_checkpoint=result.best_checkpoint)


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("evaluate"), persist_result=True, result_serializer="pickle")
def evaluate(key: str, data: DataConfig, data_path: str, data_fingerprint: str, adapter_dir: str,
             train: TrainConfig, evaluation: EvaluationConfig, primary_metric: str, champion: str | None = None,
             registry: str | None = None) -> Comparison:
    """`pipeline.evaluate_candidate`: the adapter as served (full-precision base) against its frozen base
    and, when `champion` names the promoted version, against that champion too.

    Returns the `evaluation.Comparison` (runs, metrics, per-query scores), persisted with pickle:
    it is plain data, and the gate and the report both need it whole.
    """
    dataset = load_checked(data, data_path, data_fingerprint)
    return pipeline.evaluate_candidate(pipeline.Candidate.trained(train, adapter_dir), dataset, evaluation, data,
                                       primary_metric, champion=champion, registry=registry, show_progress=False)


@task(name="gate", cache_policy=NO_CACHE)
def gate(comparison: Comparison, policy: GatePolicy) -> GateDecision:
    """`pipeline.decide`: the promotion decision, with a reason per check."""
    return pipeline.decide(comparison, policy)


class ReportRef(TypedDict):
    folder: str
    markdown: str
    metrics: dict[str, Any]


@task(name="report", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def report(comparison: Comparison, decision: GateDecision, details: dict[str, Any], evaluation: EvaluationConfig,
           title: str, out_dir: str) -> ReportRef:
    """`pipeline.write_report`: the evaluation folder (report.md/.html, plot, metrics, decision, runs)."""
    files = pipeline.write_report(out_dir, comparison, decision, details, evaluation, title=title)
    return ReportRef(folder=str(Path(out_dir)), markdown=files.markdown.read_text(encoding="utf-8"),
                     metrics=pipeline.comparison_summary(comparison))


class PublishedRef(TypedDict):
    status: str
    message: str
    spec: str | None


@task(name="publish", retries=1, retry_delay_seconds=5, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("publish"), **PERSISTED)
def publish(key: str, publish: PublishConfig, comparison: Comparison, decision: GateDecision, adapter_dir: str,
            name: str, report_dir: str, config: TrainConfig) -> PublishedRef:
    """`pipeline.publish`: register and promote the adapter if the gate passed; nothing otherwise.

    Cached, so a rerun on unchanged inputs adds no duplicate version and does not undo a rollback
    made since. Safe to retry: a version appears whole (renamed into place) or not at all.
    """
    done = pipeline.publish(publish, comparison, decision, adapter_dir, name=name, report_dir=report_dir,
                            config=json_ready(config))
    return PublishedRef(status=done.status, message=done.message, spec=done.spec)
