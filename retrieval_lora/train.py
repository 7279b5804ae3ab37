"""`python -m retrieval_lora.train`: specialize an embedder or reranker, judge it, register it if it passes.

Runs the pipeline's verbs in order (retrieval_lora.pipeline): load and check the data -> build
the training rows (hard negatives mined with the frozen base) -> train a LoRA/QLoRA adapter ->
evaluate it against its frozen base on the test split, loaded as the server loads it -> the
promotion gate (`--gate-*`) -> a report (`<output>/<task>/evaluation/report.html`) -> register
and promote the adapter as a new version of `--name` when the gate passes (`--no-register`
stops after the report). With only `--task`, it runs on the built-in demo dataset with the
packaged all-MiniLM-L6-v2 base.

Settings and data are checked before any model loads: a bad flag, folder or split fails at once.

Data-parallel on several GPUs (or CPU processes, gloo) under a launcher; `--batch-size` is the
global batch, split evenly across the processes:

    torchrun --nproc_per_node 8 -m retrieval_lora.train --task embedder --data corpus/ --batch-size 256
    accelerate launch --multi_gpu --num_processes 8 -m retrieval_lora.train --task embedder --data corpus/ --batch-size 256

Rank 0 builds the training rows (the others read them), every rank trains its share of each
step, rank 0 writes the checkpoints and the adapter, and only rank 0 evaluates, gates, reports
and publishes; the others exit 0 once training is done. `--resume` after a failed rank: start
the same command again, with the same number of processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from retrieval_lora.data import dataset_fingerprint
from retrieval_lora.manifest import write_json_atomic
from retrieval_lora.models import TASKS
from retrieval_lora.pipeline import SpecializeConfig, check_splits, load_data
from retrieval_lora.training import LOSSES, PRECISIONS, SCHEDULES, json_ready

EPILOG = """examples:
  python -m retrieval_lora.train --task embedder
  python -m retrieval_lora.train --task reranker --qlora --lora-rank 8
  python -m retrieval_lora.train --task embedder --data ../shared/datasets/scifact --epochs 1
  python -m retrieval_lora.train --task embedder --name demo --registry registry --gate-min-gain 0.01
"""
CHOICES = {"task": TASKS, "schedule": SCHEDULES, "precision": PRECISIONS,
           "loss": ("auto", *sorted({loss for group in LOSSES.values() for loss in group}))}


def parse(argv: list[str] | None = None) -> SpecializeConfig:
    """The run's settings from flags and `--config`; raises ConfigError naming every bad one."""
    parser = build_parser(SpecializeConfig, __doc__, prog="python -m retrieval_lora.train", epilog=EPILOG,
                          choices=CHOICES)
    return config_from_args(SpecializeConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    dataset = load_data(config.data)
    check_splits(dataset, config.train, config.evaluation)  # fails before any model loads
    main_process = int(os.environ.get("RANK", "0")) == 0  # one line per run, not one per launched process
    if main_process:
        print(f"Dataset {dataset.root} ({len(dataset.corpus)} documents, splits {dataset.splits}, "
              f"fingerprint {dataset_fingerprint(dataset)})", flush=True)
    from retrieval_lora import pipeline  # the heavy libraries load from here on
    from retrieval_lora.training import distributed

    here = distributed.start(config.train.device)
    started, run_dir = time.time(), Path(config.output) / config.train.task
    stages: dict[str, float] = {}  # seconds per stage, in metrics.json: where a run's time went
    rows = pipeline.build_rows(config.train, config.data, dataset, run_dir / "mining")
    stages["rows"] = round(time.time() - started, 1)
    if here.is_main:
        print(pipeline.describe_rows(rows, config.train.resolved_negatives), flush=True)
    result = pipeline.train(config.train, dataset, rows, run_dir)
    stages["training"] = round(time.time() - started - sum(stages.values()), 1)
    distributed.finish()  # every rank has finished training; rank 0 alone judges and publishes
    if not here.is_main:
        return 0
    if here.distributed:
        print(f"Trained data-parallel on {here.size} processes (global batch {config.train.resolved_batch_size})")
    if result.resumed_from:
        print(f"Resumed from {result.resumed_from}")
    print(f"Trained {result.trainable:,} of {result.total:,} parameters "
          f"({100 * result.trainable / result.total:.2f}%) on {result.train_rows} rows", flush=True)
    name = config.publish.name or pipeline.default_name(dataset, config.train.task)
    champion = (pipeline.find_champion(config.publish, name, result.adapter_dir)
                if config.gate.against_champion else None)
    if champion:
        print(f"Champion: {champion} (promoted now); the candidate must beat it too", flush=True)
    candidate = pipeline.Candidate.trained(config.train, result.adapter_dir)
    comparison = pipeline.evaluate_candidate(candidate, dataset, config.evaluation, config.data,
                                             config.gate.primary_metric, champion=champion,
                                             registry=config.publish.registry)
    stages["evaluation"] = round(time.time() - started - sum(stages.values()), 1)
    decision = pipeline.decide(comparison, config.gate)
    details = pipeline.report_details(dataset, candidate, config.evaluation, config.data)
    report = pipeline.write_report(run_dir / "evaluation", comparison, decision, details, config.evaluation,
                                   title=f"{config.train.task.capitalize()} adapter vs frozen base on "
                                         f"{dataset.name}/{config.evaluation.split}", config=config)
    print(pipeline.format_outcome(comparison, decision))
    write_json_atomic(run_dir / "metrics.json", {
        **pipeline.comparison_summary(comparison), "decision": decision.to_dict(), "config": json_ready(config.train),
        "seconds": round(time.time() - started, 1), "stage_seconds": stages})
    size_kb = os.path.getsize(result.adapter_dir / "adapter_model.safetensors") / 1024
    print(f"Adapter written to {result.adapter_dir} ({size_kb:,.0f} KB); metrics in {run_dir / 'metrics.json'}")
    print(f"Report: {report.html} (and report.md)")
    published = pipeline.publish(config.publish, comparison, decision, result.adapter_dir, name=name,
                                 report_dir=report.html.parent, config=json_ready(config.train))
    print(published.message)
    return 3 if config.publish.fail_on_reject and published.status in ("rejected", "stale") else 0


if __name__ == "__main__":
    run_cli(main)
