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

from datasets import Dataset
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.caching import key_parameter
from retrieval_lora.data import dataset_fingerprint, load_dataset, load_pairs, pairs_fingerprint, pairs_from_qrels
from retrieval_lora.errors import ConfigError, DataError
from retrieval_lora.evaluation import Comparison, compare_with_base
from retrieval_lora.gate import GateDecision, GatePolicy, decide
from retrieval_lora.manifest import replace_dir_atomic, staging_dir
from retrieval_lora.mining import MiningConfig, mine_hard_negatives, save_mining_result
from retrieval_lora.models import load_adapter, load_base
from retrieval_lora.registry import Registry
from retrieval_lora.report import comparison_summary, write_evaluation
from retrieval_lora.training import TrainConfig, json_ready, last_complete_checkpoint, train_adapter

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


def load_checked(path: str, fingerprint: str):
    """The dataset at `path`, refusing one that changed since the flow fingerprinted it."""
    dataset = load_dataset(path)
    now = dataset_fingerprint(dataset)
    if now != fingerprint:
        raise DataError(f"dataset {path} changed while the flow ran (fingerprint {fingerprint} -> {now}); "
                        "run the flow again once the folder is no longer being written")
    return dataset


@task(name="load-data", retries=2, retry_delay_seconds=30, retry_condition_fn=not_a_setting_error)
def load_data(data: str | None) -> DataRef:
    """Load and validate the BEIR folder `data` (None: the built-in demo) and fingerprint it.

    Never cached: the fingerprint is what tells later steps whether the data changed.
    """
    dataset = load_dataset(data)
    return DataRef(path=str(Path(dataset.root).resolve()), fingerprint=dataset_fingerprint(dataset),
                   documents=len(dataset.corpus), splits=list(dataset.splits))


def _save_rows(rows: Dataset, out: Path) -> None:
    staging = staging_dir(out)
    rows.save_to_disk(str(staging / "rows"))
    replace_dir_atomic(staging, out)


@task(name="training-rows", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("rows"), **PERSISTED)
def training_rows(key: str, data_path: str, data_fingerprint: str, split: str, base: str,
                  max_seq_length: int | None, mining: MiningConfig | None, out_dir: str) -> RowsRef:
    """Write the training rows of `split` to `out_dir/rows`: mined hard negatives, or plain pairs.

    `mining` set: mine with the frozen `base` embedder (`out_dir` also gets the mining scores,
    stats and manifest). None: the labelled (query, positive) pairs, so the embedder learns
    from in-batch negatives only.
    """
    dataset = load_checked(data_path, data_fingerprint)
    out = Path(out_dir)
    if mining is None:
        rows = pairs_from_qrels(dataset, split)
        _save_rows(rows, out)
        stats: dict[str, Any] = {}
    else:
        model = load_base("embedder", base, max_seq_length=max_seq_length)
        result = mine_hard_negatives(model, dataset, split, mining)
        result.manifest.update(base=base, max_seq_length=max_seq_length)
        save_mining_result(result, out)
        rows, stats = result.training_rows(), json.loads(json.dumps(result.stats, default=str))
    return RowsRef(path=str(out / "rows"), fingerprint=pairs_fingerprint(rows), rows=len(rows),
                   mined=mining is not None, stats=stats)


@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("train"), **PERSISTED)
def train(key: str, data_path: str, data_fingerprint: str, rows_path: str, config: TrainConfig,
          run_dir: str) -> TrainedRef:
    """Train an adapter on the rows at `rows_path`; resume from `run_dir`'s last checkpoint if any.

    `run_dir` is named after `key`, so the checkpoints found there belong to a run with the
    same data, rows and settings: an interrupted run (crash, kill, retry) picks up from them.
    """
    dataset = load_checked(data_path, data_fingerprint)
    folder = Path(run_dir)
    resume = last_complete_checkpoint(folder / "checkpoints") is not None
    config = dataclasses.replace(config, output=str(folder), resume=resume)
    result = train_adapter(config, dataset, folder, rows=load_pairs(rows_path))
    return TrainedRef(run_dir=str(folder), adapter_dir=str(result.adapter_dir), train_rows=result.train_rows,
                      resumed_from=result.resumed_from, best_checkpoint=result.best_checkpoint)


@task(name="evaluate", retries=1, retry_delay_seconds=10, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("evaluate"), persist_result=True, result_serializer="pickle")
def evaluate(key: str, data_path: str, data_fingerprint: str, adapter_dir: str, config: TrainConfig,
             primary_metric: str) -> Comparison:
    """Score the frozen base and the adapter on `config.eval_split`, with paired significance tests.

    Returns the `evaluation.Comparison` (runs, metrics, per-query scores), persisted with pickle:
    it is plain data, and the gate and the report both need it whole.
    """
    dataset = load_checked(data_path, data_fingerprint)
    model = load_base(config.task, config.base, qlora=config.qlora, max_seq_length=config.max_seq_length,
                      device=config.device)
    load_adapter(model, adapter_dir, config.task)
    return compare_with_base(config.task, model, dataset, config.eval_split, base=config.base,
                             k=config.eval_top_k, rerank_k=config.rerank_top_k, primary_metric=primary_metric,
                             show_progress=False)


@task(name="gate", cache_policy=NO_CACHE)
def gate(comparison: Comparison, policy: GatePolicy) -> GateDecision:
    """The promotion decision for `comparison` under `policy`, with a reason per check."""
    return decide(comparison.paired, policy)


class ReportRef(TypedDict):
    folder: str
    markdown: str
    metrics: dict[str, Any]


@task(name="report", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def report(comparison: Comparison, decision: GateDecision, details: dict[str, Any], out_dir: str) -> ReportRef:
    """Write the evaluation folder (report.md/.html, plot, metrics, decision, runs) to `out_dir`."""
    files = write_evaluation(out_dir, comparison, decision, alpha=decision.policy["alpha"],
                             primary_metric=decision.primary_metric, details=details)
    return ReportRef(folder=str(Path(out_dir)), markdown=files.markdown.read_text(encoding="utf-8"),
                     metrics=comparison_summary(comparison))


class Registered(TypedDict):
    spec: str
    version: int
    path: str


@task(name="register", retries=1, retry_delay_seconds=5, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("register"), **PERSISTED)
def register(key: str, registry: str, name: str, adapter_dir: str, report_dir: str, metrics: dict[str, Any],
             decision: dict[str, Any], config: TrainConfig) -> Registered:
    """Add the adapter to the registry as a new version, with its metrics, gate decision and report.

    Cached, so a rerun on unchanged inputs adds no duplicate version. Safe to retry: a version
    appears whole (renamed into place) or not at all.
    """
    version = Registry(registry).register(name, Path(adapter_dir), metrics=metrics, decision=decision,
                                          report_dir=Path(report_dir), config=json_ready(config))
    return Registered(spec=version.spec, version=version.version, path=str(version.path))


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=not_a_setting_error,
      cache_key_fn=key_parameter("promote"), **PERSISTED)
def promote(key: str, registry: str, name: str, version: int, reason: str) -> str:
    """Point `name` at `version` (atomic; promoting the promoted version again changes nothing).

    Cached, so a rerun on unchanged inputs does not undo a rollback made since.
    """
    return Registry(registry).promote(name, version, reason=reason).spec
