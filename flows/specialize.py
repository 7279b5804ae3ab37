"""The `specialize` flow: data -> training rows (mined) -> train -> evaluate -> gate -> register -> promote.

    python -m flows.specialize                                   # the built-in demo dataset
    python -m flows.specialize --data ../shared/datasets/scifact --name scifact
    python -m flows.specialize --config flows/nightly.yaml       # train:, mining:, gate: sections

Every step is a task in `flows.tasks` that calls one retrieval_lora function. Each cached step
is keyed by a digest of the fingerprints and settings it depends on (`flows.caching`), its
result persisted under `<workdir>/prefect-results`, and its files written to
`<workdir>/<step>/<key>`. Hence:

- a rerun after a crash reuses every finished step, and training resumes from its last
  checkpoint (same key, same folder);
- a run on unchanged data and settings skips mining, training, evaluation, registering and
  promoting, and its outcome says so (`training: "skipped: ..."`); only the gate and the
  report, which are cheap, run again;
- a change anywhere (a document edited, a setting changed) changes the keys downstream of it.

Old `<workdir>/<step>/<key>` folders are not deleted: remove the work folder to reclaim space
(the next run then recomputes everything).

The flow returns a `SpecializeOutcome`: promoted or rejected, the gate's reasons, the metrics
and what each step did. The report is a markdown artifact and the metrics a table artifact.
With no `PREFECT_API_URL`, Prefect runs a temporary local API server for the run.

Not supported: `train.train_pairs` (the flow builds the rows itself; use
`python -m retrieval_lora.train --train-pairs` for prepared rows).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import flows  # noqa: F401  (telemetry off before Prefect loads)
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import TaskRunner

from flows import tasks
from flows.caching import CachedSteps, plain, step_key
from flows.encode import RunnerKind, encode_corpus, make_task_runner
from retrieval_lora.config import read_config_file
from retrieval_lora.errors import ConfigError
from retrieval_lora.gate import GatePolicy
from retrieval_lora.mining import MiningConfig
from retrieval_lora.training import RESUME_IGNORED, TrainConfig, json_ready, mining_config

# Settings that do not change the trained adapter: where it goes, how it is evaluated, and the
# mining switches (the rows step applies them; their effect reaches training via the rows' fingerprint).
NOT_TRAINING = RESUME_IGNORED | {"data", "eval_split", "eval_top_k", "rerank_top_k", "negatives", "mining", "miner"}
# Mining settings that do not change the mined rows.
NOT_MINING = {"show_progress", "cache_dir"}


@dataclass
class SpecializeOutcome:
    """What a run decided and why; `steps` maps each step to its final state (Completed, Cached)."""

    status: Literal["promoted", "rejected"]
    reasons: list[str]
    training: str
    version: str
    metrics: dict[str, Any]
    steps: dict[str, str]
    data_fingerprint: str
    report_dir: str

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, what training did, the gate's reasons."""
        lines = [f"{self.status.upper()} {self.version}", f"training: {self.training}"]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def _training_settings(train: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in json_ready(train).items() if k not in NOT_TRAINING}


def _mining_settings(mining: MiningConfig | None) -> dict[str, Any] | None:
    return None if mining is None else {k: v for k, v in plain(mining).items() if k not in NOT_MINING}


def _training_note(state_name: str, trained: tasks.TrainedRef) -> str:
    if state_name == "Cached":
        return f"skipped: data and settings unchanged, reusing {trained['adapter_dir']}"
    if trained["resumed_from"]:
        return f"resumed from {Path(trained['resumed_from']).name}"
    return "trained"


def _mining_config(train: TrainConfig, mining: MiningConfig | None, documents: int) -> MiningConfig | None:
    """The mining this run does (see the `mining` parameter)."""
    if not train.mines_negatives:
        return None
    return mining if mining is not None else mining_config(train, documents)


def _encode_sharded(data: tasks.DataRef, train: TrainConfig, mining: MiningConfig, shards: int,
                    runner: TaskRunner, workdir: str) -> None:
    """Pre-fill mining's embedding cache with the corpus encoded in `shards` tasks on `runner`."""
    encode_corpus.with_options(task_runner=runner)(
        data=data["path"], base=train.miner or train.base, max_seq_length=train.max_seq_length, shards=shards,
        batch_size=mining.batch_size, cache_dir=mining.cache_dir, cache_dtype=mining.cache_dtype, workdir=workdir)


def _artifacts(name: str, outcome: SpecializeOutcome, report_markdown: str) -> None:
    """The report as a markdown artifact and the metrics as a table artifact, keyed by the adapter name."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "adapter"
    header = (f"**{outcome.status.upper()}** {outcome.version}. Training: {outcome.training}. "
              f"Data fingerprint `{outcome.data_fingerprint}`.\n\n")
    create_markdown_artifact(header + report_markdown, key=f"specialize-report-{slug}",
                             description=f"{name}: evaluation report and gate decision")
    metrics = outcome.metrics
    rows = [{"metric": metric, "baseline": round(base, 4), "adapter": round(metrics["adapter"][metric], 4),
             "delta": round(metrics["adapter"][metric] - base, 4)} for metric, base in metrics["baseline"].items()]
    create_table_artifact(rows, key=f"specialize-metrics-{slug}",
                          description=f"{name}: {metrics['baseline_name']} vs adapter on split {metrics['split']}")


@flow(name="specialize")
def specialize(train: TrainConfig = TrainConfig(), mining: MiningConfig | None = None,
               gate: GatePolicy = GatePolicy(), name: str = "demo", registry: str = "registry",
               workdir: str = "runs/flows", encode_shards: int = 1, task_runner: RunnerKind = "threads",
               dask_address: str | None = None) -> SpecializeOutcome:
    """Specialize an embedder or reranker to a dataset; promote the adapter if it passes the gate.

    Args:
        train: training and evaluation settings (`data`: BEIR folder, empty for the built-in
            demo; `output` and `resume` are managed by the flow).
        mining: full mining settings (window, margin, cache...); default: mine as the train CLI
            does (`train.negatives` per row, default 1 for an embedder and 4 for a reranker, with
            `train.miner`); none when `train.mining` is false or `train.negatives` is 0.
        gate: the promotion policy the adapter must pass.
        name: the adapter's name in the registry.
        registry: the registry folder.
        workdir: folder for every step's files and the persisted task results.
        encode_shards: above 1, encode the corpus for mining in this many parallel tasks first.
        task_runner: where those tasks run: 'threads' (this process) or 'dask'.
        dask_address: an existing Dask scheduler (default: a local Dask cluster).
    """
    if train.train_pairs:
        raise ConfigError("train.train_pairs is not supported by the flow (it builds the rows itself); "
                          "use `python -m retrieval_lora.train --train-pairs` for prepared rows")
    steps = CachedSteps(Path(workdir).resolve())
    data = tasks.load_data(train.data)
    get_run_logger().info(f"dataset {data['path']}: {data['documents']} documents, fingerprint {data['fingerprint']}")
    mining = _mining_config(train, mining, data["documents"])
    miner = train.miner or train.base
    if encode_shards > 1 and mining is not None and mining.cache_dir:
        runner = make_task_runner(task_runner, workers=encode_shards, address=dask_address)
        _encode_sharded(data, train, mining, encode_shards, runner, workdir)
    source = dict(data_path=data["path"], data_fingerprint=data["fingerprint"])

    rows_key = step_key("rows", data["fingerprint"], train.train_split, miner, train.max_seq_length,
                        _mining_settings(mining))
    rows = steps.run("rows", tasks.training_rows, check="path", key=rows_key, **source, split=train.train_split,
                     base=miner, max_seq_length=train.max_seq_length, mining=mining,
                     out_dir=steps.folder("rows", rows_key))
    train_key = step_key("train", data["fingerprint"], rows["fingerprint"], _training_settings(train))
    trained = steps.run("train", tasks.train, check="adapter_dir", key=train_key, **source, rows_path=rows["path"],
                        config=train, run_dir=steps.folder("train", train_key))
    training_note = _training_note(steps.states["train"], trained)
    get_run_logger().info(f"training: {training_note}")

    eval_key = step_key("evaluate", train_key, train.eval_split, train.eval_top_k, train.rerank_top_k,
                        gate.primary_metric)
    comparison = steps.run("evaluate", tasks.evaluate, key=eval_key, **source, adapter_dir=trained["adapter_dir"],
                           config=train, primary_metric=gate.primary_metric)
    decision = tasks.gate(comparison, gate)
    details = {"data": data["path"], "data fingerprint": data["fingerprint"], "adapter": trained["adapter_dir"],
               "training": training_note, "training rows": f"{rows['rows']} ({'mined' if rows['mined'] else 'pairs'})"}
    report_key = step_key("report", eval_key, plain(gate))
    written = tasks.report(comparison, decision, details, out_dir=steps.folder("report", report_key))
    publish_key = step_key("publish", report_key, str(Path(registry).resolve()), name)
    registered = steps.run("register", tasks.register, check="path", key=publish_key, registry=registry, name=name,
                           adapter_dir=trained["adapter_dir"], report_dir=written["folder"],
                           metrics=written["metrics"], decision=decision.to_dict(), config=train)
    if decision.passed:
        steps.run("promote", tasks.promote, key=publish_key, registry=registry, name=name,
                  version=registered["version"], reason=f"gate passed: {decision.reasons[0]}")

    outcome = SpecializeOutcome(
        status="promoted" if decision.passed else "rejected", reasons=list(decision.reasons),
        training=training_note, version=registered["spec"], steps=steps.states, data_fingerprint=data["fingerprint"],
        metrics={"split": comparison.split, "baseline_name": comparison.baseline_name,
                 "baseline": comparison.baseline, "adapter": comparison.adapter}, report_dir=written["folder"])
    _artifacts(name, outcome, written["markdown"])
    get_run_logger().info(outcome.summary())
    return outcome


def parameters_from_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Flow parameters from `--config FILE` (keys = the flow's parameters) and a few flags."""
    parser = argparse.ArgumentParser(prog="python -m flows.specialize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/TOML file whose keys are the flow's parameters "
                                         "(train:, mining:, gate:, name:, registry:, workdir:)")
    parser.add_argument("--data", help="BEIR folder (default: the built-in demo); sets train.data")
    parser.add_argument("--task", choices=("embedder", "reranker"), help="sets train.task")
    parser.add_argument("--no-mining", action="store_true", help="train on the labelled pairs only")
    for flag in ("name", "registry", "workdir"):
        parser.add_argument(f"--{flag}")
    args = parser.parse_args(argv)
    parameters = read_config_file(args.config) if args.config else {}
    train = dict(parameters.get("train") or {})
    for key in ("data", "task"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    parameters["train"] = train
    if args.no_mining:
        train["mining"] = False
    for flag in ("name", "registry", "workdir"):
        if getattr(args, flag) is not None:
            parameters[flag] = getattr(args, flag)
    return parameters


def main(argv: list[str] | None = None) -> int:
    outcome = specialize(**parameters_from_args(argv))
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
