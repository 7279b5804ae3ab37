"""`python -m retrieval_lora.train`: train an adapter and compare it with its frozen base.

With only `--task`, trains on the built-in demo dataset (Python standard library code search)
with the packaged all-MiniLM-L6-v2 base, evaluates base and adapter on the test split, prints
both side by side and writes the adapter under `--output`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from retrieval_lora.data import dataset_fingerprint, load_dataset
from retrieval_lora.evaluation import Comparison, compare_with_base
from retrieval_lora.manifest import write_json_atomic
from retrieval_lora.models import TASKS
from retrieval_lora.training import LOSSES, SCHEDULES, TrainConfig, json_ready, train_adapter

EPILOG = """examples:
  python -m retrieval_lora.train --task embedder
  python -m retrieval_lora.train --task reranker --qlora --rank 8
  python -m retrieval_lora.train --task embedder --data ../shared/datasets/scifact --epochs 1
"""


def format_comparison(comparison: Comparison) -> str:
    """A plain-text table: one row per metric, baseline, adapter and the difference."""
    lines = [f"{'metric':<12} {'base':>8} {'adapter':>8} {'delta':>8}   (split: {comparison.split}; "
             f"base = {comparison.baseline_name})"]
    for name, base_value in comparison.baseline.items():
        adapter_value = comparison.adapter[name]
        lines.append(f"{name:<12} {base_value:>8.4f} {adapter_value:>8.4f} {adapter_value - base_value:>+8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(TrainConfig, __doc__, prog="python -m retrieval_lora.train", epilog=EPILOG,
                          choices={"task": TASKS, "schedule": SCHEDULES,
                                   "loss": ("auto", *sorted({l for group in LOSSES.values() for l in group}))})
    config: TrainConfig = config_from_args(TrainConfig, parser.parse_args(argv))
    run_dir = Path(config.output) / config.task
    started = time.time()
    dataset = load_dataset(config.data)
    print(f"Dataset {dataset.root} ({len(dataset.corpus)} documents, splits {dataset.splits}, "
          f"fingerprint {dataset_fingerprint(dataset)})", flush=True)
    result = train_adapter(config, dataset, run_dir)
    if result.resumed_from:
        print(f"Resumed from {result.resumed_from}")
    print(f"Trained {result.trainable:,} of {result.total:,} parameters "
          f"({100 * result.trainable / result.total:.2f}%) on {result.train_rows} rows", flush=True)
    comparison = compare_with_base(config.task, result.model, dataset, config.eval_split, base=config.base,
                                   k=config.eval_top_k, rerank_k=config.rerank_top_k)
    print(format_comparison(comparison))
    write_json_atomic(run_dir / "metrics.json", {
        "split": comparison.split, "baseline_name": comparison.baseline_name, "baseline": comparison.baseline,
        "adapter": comparison.adapter, "config": json_ready(config), "seconds": round(time.time() - started, 1),
    })
    size_kb = os.path.getsize(result.adapter_dir / "adapter_model.safetensors") / 1024
    print(f"Adapter written to {result.adapter_dir} ({size_kb:,.0f} KB); metrics in {run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
