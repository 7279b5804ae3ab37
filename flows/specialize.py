"""The `specialize` flow: data -> training rows (mined) -> train -> evaluate -> gate -> report -> publish.

    python -m flows.specialize                                   # the built-in demo dataset
    python -m flows.specialize --data ../shared/datasets/scifact --name scifact
    python -m flows.specialize --config flows/nightly.yaml       # data:, train:, evaluation:, gate:, publish:

Every step is a task in `flows.tasks` that calls one verb of `retrieval_lora.pipeline`, the same
verbs `python -m retrieval_lora.train` runs in order, with the same config sections. Each cached step
is keyed by a digest of the fingerprints and settings it depends on (`flows.caching`), its
result persisted under `<workdir>/prefect-results`, and its files written to
`<workdir>/<step>/<key>`. Hence:

- a rerun after a crash reuses every finished step, and training resumes from its last
  checkpoint (same key, same folder);
- a run on unchanged data and settings skips mining, training, evaluation, registering and
  promoting, and its outcome says so (`training: "skipped: ..."`); only the gate and the
  report, which are cheap, run again;
- a change anywhere (a document edited, a setting changed) changes the keys downstream of it;
  settings that do not change the weights (gradient checkpointing, and the checkpoint frequency
  when no dev split picks a best checkpoint) do not retrain.

Champion/challenger: when the adapter's name already has a promoted version (the champion), the
candidate is evaluated beside it on the same queries (loaded from the registry as the server
loads it) and must beat it too (`gate.against_champion`, on by default); the promotion is a
compare-and-swap against that champion. Progress (steps, loss, ETA, dev metric) goes to the
run's logs every 30 s.

Old `<workdir>/<step>/<key>` folders are not deleted: remove the work folder to reclaim space
(the next run then recomputes everything).

The flow returns a `SpecializeOutcome`: the status, the gate's reasons, the metrics, what each
step did and what the registry promotes after the run (read again, never a cached answer). A
rejected candidate is not registered (as with the train command) and the run ends in a Failed
state named "Rejected", with the outcome as its data: alert on it like any failure
(`flows.specialize.run(...)` returns the outcome either way; `python -m flows.specialize` exits 3).
The report is a markdown artifact and the metrics a table artifact. With no `PREFECT_API_URL`,
Prefect runs a temporary local API server for the run. Not supported:
`train.train_pairs` (the flow builds the rows itself; use `python -m retrieval_lora.train
--train-pairs` for prepared rows).
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
from prefect.states import Failed
from prefect.task_runners import TaskRunner

from flows import tasks
from flows.caching import CachedSteps, plain, step_key
from flows.encode import RunnerKind, cluster_address, encode_corpus, make_task_runner
from retrieval_lora.registry import registry_root
from retrieval_lora.config import read_config_file
from retrieval_lora.errors import ConfigError
from retrieval_lora.gate import GatePolicy
from retrieval_lora.mining import MiningConfig
from retrieval_lora.pipeline import DataConfig, EvaluationConfig, PublishConfig, check_gate_metric
from retrieval_lora.pipeline.verbs import find_champion, guard_fingerprints
from retrieval_lora.training import TrainConfig, mining_config, weight_settings

# Mining switches: the rows step applies them; their effect reaches training through the rows' fingerprint.
NOT_TRAINING = {"negatives", "mining", "miner"}
# Mining settings that do not change the mined rows.
NOT_MINING = {"show_progress", "cache_dir"}


@dataclass
class SpecializeOutcome:
    """What a run decided and why; `steps` maps each step to its final state (Completed, Cached)."""

    # promoted; rejected (by the gate, not registered); stale (another version was promoted while this one was
    # judged: not promoted); passed (the gate passed, registering was off)
    status: Literal["promoted", "rejected", "stale", "passed"]
    reasons: list[str]
    training: str
    version: str
    metrics: dict[str, Any]
    steps: dict[str, str]
    data_fingerprint: str
    report_dir: str

    promoted_now: str | None = None  # what the registry promotes after this run (read after publishing)

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, what training did, the gate's reasons."""
        lines = [f"{self.status.upper()} {self.version}", f"training: {self.training}",
                 f"registry now promotes: {self.promoted_now or 'nothing'}"]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def _training_settings(train: TrainConfig, splits: list[str]) -> dict[str, Any]:
    return {k: v for k, v in weight_settings(train, splits).items() if k not in NOT_TRAINING}


def _mining_settings(mining: MiningConfig | None) -> dict[str, Any] | None:
    return None if mining is None else {k: v for k, v in plain(mining).items() if k not in NOT_MINING}


def _rows_extras(train: TrainConfig, data: DataConfig, loaded: dict[str, Any]) -> dict[str, Any]:
    """What else goes into the rows step's folder: the teacher's margins, and for a reranker the
    dev queries' first-stage candidates (`dev_first_stage.json`, which depend on the dev split and
    on `exclude_self`)."""
    dev = train.resolved_dev_split(loaded["splits"]) if train.task == "reranker" else None
    return {"teacher": train.teacher, "dev_first_stage": dev, "exclude_self": data.exclude_self if dev else None}


def _training_note(state_name: str, trained: tasks.TrainedRef) -> str:
    if state_name == "Cached":
        return f"skipped: data and settings unchanged, reusing {trained['adapter_dir']}"
    if trained["resumed_from"]:
        return f"resumed from {Path(trained['resumed_from']).name}"
    return "trained"


def _mining_config(train: TrainConfig, data: DataConfig, mining: MiningConfig | None,
                   documents: int) -> MiningConfig | None:
    """The mining this run does (see the `mining` parameter); the same default as the train command's."""
    if not train.mines_negatives:
        return None
    return mining if mining is not None else mining_config(train, documents, cache_dir=data.cache_dir or None)


def _encode_sharded(data: tasks.DataRef, train: TrainConfig, mining: MiningConfig, shards: int,
                    runner: TaskRunner, workdir: str, shard_gpus: float) -> None:
    """Pre-fill mining's embedding cache with the corpus encoded in `shards` tasks on `runner`."""
    encode_corpus.with_options(task_runner=runner)(
        data=data["path"], base=train.miner or train.base, max_seq_length=train.max_seq_length, shards=shards,
        batch_size=mining.batch_size, cache_dir=mining.cache_dir, cache_dtype=mining.cache_dtype, workdir=workdir,
        shard_gpus=shard_gpus)


def _artifacts(name: str, outcome: SpecializeOutcome, report_markdown: str) -> None:
    """The report as a markdown artifact and the metrics as a table artifact, keyed by the adapter name."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "adapter"
    header = (f"**{outcome.status.upper()}** {outcome.version}. Training: {outcome.training}. "
              f"Data fingerprint `{outcome.data_fingerprint}`.\n\n")
    # The UI cannot fetch the plot file beside report.md: point at the self-contained HTML report instead.
    html = Path(outcome.report_dir) / "report.html"
    body = "\n".join(f"The plot is in the self-contained HTML report: `{html}`" if line.startswith("![") else line
                     for line in report_markdown.splitlines())
    create_markdown_artifact(header + body, key=f"specialize-report-{slug}",
                             description=f"{name}: evaluation report and gate decision")
    metrics = outcome.metrics
    rows = [{"metric": metric, "baseline": round(base, 4), "adapter": round(metrics["adapter"][metric], 4),
             "delta": round(metrics["adapter"][metric] - base, 4)} for metric, base in metrics["baseline"].items()]
    create_table_artifact(rows, key=f"specialize-metrics-{slug}",
                          description=f"{name}: {metrics['baseline_name']} vs adapter on split {metrics['split']}")


@flow(name="specialize")
def specialize(data: DataConfig = DataConfig(), train: TrainConfig = TrainConfig(), mining: MiningConfig | None = None,
               evaluation: EvaluationConfig = EvaluationConfig(), gate: GatePolicy = GatePolicy(),
               publish: PublishConfig = PublishConfig(), workdir: str = "runs/flows", encode_shards: int = 1,
               task_runner: RunnerKind = "threads", dask_address: str | None = None, ray_address: str | None = None,
               shard_gpus: float = 0.0) -> SpecializeOutcome:
    """Specialize an embedder or reranker to a dataset; promote the adapter if it passes the gate.

    Args:
        data: the dataset (`path`: BEIR folder, empty for the built-in demo).
        train: training settings (`resume` is managed by the flow).
        mining: full mining settings (window, margin, cache...); default: mine as the train command
            does (`train.negatives` per row, default 1 for an embedder and 4 for a reranker, with
            `train.miner`); none when `train.mining` is false or `train.negatives` is 0.
        evaluation: how the candidate is compared with its frozen base after training.
        gate: the promotion policy the adapter must pass.
        publish: registry folder (default: $RETRIEVAL_LORA_REGISTRY or ./registry) and adapter name
            (default: <dataset folder name>-<task>).
        workdir: folder for every step's files and the persisted task results.
        encode_shards: above 1, encode the corpus for mining in this many parallel tasks first.
        task_runner: where those tasks run: 'threads' (this process), 'dask' or 'ray' (a local cluster of
            `encode_shards` worker processes, or the existing one at `dask_address` / `ray_address`).
        dask_address: an existing Dask scheduler (default: a local Dask cluster).
        ray_address: an existing Ray cluster, e.g. ray://head:10001 (default: a local Ray cluster).
        shard_gpus: GPUs Ray reserves for each encode task (task_runner 'ray' only; 0: none).
    """
    if train.train_pairs:
        raise ConfigError("train.train_pairs is not supported by the flow (it builds the rows itself); "
                          "use `python -m retrieval_lora.train --train-pairs` for prepared rows")
    check_gate_metric(gate, evaluation)
    address = cluster_address(task_runner, dask_address, ray_address)
    steps = CachedSteps(Path(workdir).resolve())
    loaded = tasks.load_data(data, train, evaluation)
    get_run_logger().info(f"dataset {loaded['path']}: {loaded['documents']} documents, "
                          f"fingerprint {loaded['fingerprint']}")
    mining = _mining_config(train, data, mining, loaded["documents"])
    miner = train.miner or train.base
    if encode_shards > 1 and mining is not None and mining.cache_dir:
        runner = make_task_runner(task_runner, workers=encode_shards, address=address)
        _encode_sharded(loaded, train, mining, encode_shards, runner, workdir, shard_gpus)
    source = dict(data=data, data_path=loaded["path"], data_fingerprint=loaded["fingerprint"])

    pseudo = train.pseudo_settings()
    rows_key = step_key("rows", loaded["fingerprint"], train.train_split, miner, train.max_seq_length,
                        _mining_settings(mining), *([repr(pseudo)] if pseudo else []), _rows_extras(train, data, loaded))
    rows = steps.run("rows", tasks.training_rows, check="path", key=rows_key, **source, train=train, mining=mining,
                     out_dir=steps.folder("rows", rows_key))
    train_key = step_key("train", loaded["fingerprint"], rows["fingerprint"], _training_settings(train, loaded["splits"]))
    trained = steps.run("train", tasks.train, check="adapter_dir", key=train_key, **source, rows=rows,
                        config=train, run_dir=steps.folder("train", train_key))
    training_note = _training_note(steps.states["train"], trained)
    get_run_logger().info(f"training: {training_note}")

    name = publish.name or f"{Path(loaded['path']).name}-{train.task}"
    registry = str(registry_root(publish.registry).resolve())
    champion = find_champion(publish, name, trained["adapter_dir"]) if gate.against_champion else None
    eval_key = step_key("evaluate", train_key, plain(evaluation), data.exclude_self, gate.primary_metric, champion,
                        registry if champion else None, guard_fingerprints(evaluation, data) or None)
    comparison = steps.run("evaluate", tasks.evaluate, key=eval_key, **source, adapter_dir=trained["adapter_dir"],
                           train=train, evaluation=evaluation, primary_metric=gate.primary_metric, champion=champion,
                           registry=registry)
    decision = tasks.gate(comparison, gate)
    details = {"data": loaded["path"], "data fingerprint": loaded["fingerprint"], "adapter": trained["adapter_dir"],
               "base model": f"{train.base} (full precision, as served)", "training": training_note,
               "training rows": f"{rows['rows']} ({'mined' if rows['mined'] else 'pairs'})"}
    report_key = step_key("report", eval_key, plain(gate))
    written = tasks.report(comparison, decision, details, evaluation, title=f"{train.task.capitalize()} adapter vs "
                           f"frozen base on {Path(loaded['path']).name}/{evaluation.split}",
                           out_dir=steps.folder("report", report_key))
    publish_key = step_key("publish", report_key, registry, name, publish.register)
    published = steps.run("publish", tasks.publish, key=publish_key, publish=publish, comparison=comparison,
                          decision=decision, adapter_dir=trained["adapter_dir"], name=name,
                          report_dir=written["folder"], config=train)

    outcome = SpecializeOutcome(
        status=published["status"], reasons=list(decision.reasons), training=training_note,
        version=published["spec"] or "(not registered)", steps=steps.states, data_fingerprint=loaded["fingerprint"],
        metrics={"split": comparison.split, "baseline_name": comparison.baseline_name,
                 "baseline": comparison.baseline, "adapter": comparison.adapter, "champion": champion},
        report_dir=written["folder"], promoted_now=find_champion(publish, name))  # re-read: never a stale cached answer
    _artifacts(name, outcome, written["markdown"])
    get_run_logger().info(outcome.summary())
    if outcome.status in ("rejected", "stale"):
        # A rejection is a state a Prefect user can alert on: Failed, named "Rejected"; the outcome is its data.
        return Failed(name="Rejected", message=outcome.summary().replace("\n", "; "), data=outcome)
    return outcome


def parameters_from_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Flow parameters from `--config FILE` (keys = the flow's parameters) and a few flags."""
    parser = argparse.ArgumentParser(prog="python -m flows.specialize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/TOML file whose keys are the flow's parameters "
                                         "(data:, train:, mining:, evaluation:, gate:, publish:, workdir:)")
    parser.add_argument("--data", help="BEIR folder (default: the built-in demo); sets data.path")
    parser.add_argument("--task", choices=("embedder", "reranker"), help="sets train.task")
    parser.add_argument("--no-mining", action="store_true", help="train on the labelled pairs only")
    parser.add_argument("--name", help="adapter name in the registry; sets publish.name")
    parser.add_argument("--registry", help="registry folder; sets publish.registry")
    parser.add_argument("--workdir", help="folder for every step's files and the persisted task results")
    args = parser.parse_args(argv)
    parameters = read_config_file(args.config) if args.config else {}
    sections = {name: dict(parameters.get(name) or {}) for name in ("data", "train", "publish")}
    for section, key, value in (("data", "path", args.data), ("train", "task", args.task),
                                ("train", "mining", False if args.no_mining else None),
                                ("publish", "name", args.name), ("publish", "registry", args.registry)):
        if value is not None:
            sections[section][key] = value
    parameters.update({name: values for name, values in sections.items() if values})
    if args.workdir is not None:
        parameters["workdir"] = args.workdir
    return parameters


def run(**parameters: Any) -> SpecializeOutcome:
    """Run the flow and return its outcome, whether it promoted or ended in the Rejected state.

    The run is created with every setting resolved (defaults filled in), so the Prefect UI's
    Parameters tab shows what the run used, not only what the caller typed.
    """
    resolved = specialize.validate_parameters(parameters)
    return specialize(**resolved, return_state=True).result(raise_on_failure=False)


def main(argv: list[str] | None = None) -> int:
    outcome = run(**parameters_from_args(argv))
    if not isinstance(outcome, SpecializeOutcome):  # the run failed for another reason: re-raise it
        raise outcome
    print(outcome.summary())
    return 3 if outcome.status in ("rejected", "stale") else 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
