"""`python -m retrieval_lora.train`: train an adapter and compare it with its frozen base.

With only `--task`, trains on the built-in demo dataset (Python standard library code search)
with the packaged all-MiniLM-L6-v2 base and writes the adapter under `--output`. Then it
evaluates base and adapter on the test split with a paired significance test, applies the
promotion gate (`--gate-*` flags), writes a report (`<output>/<task>/evaluation/report.html`)
and, when the gate passes, registers the adapter as a new version of `--name` in the registry
and promotes it. `--no-register` stops after the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import typing
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from retrieval_lora.data import dataset_fingerprint, load_dataset
from retrieval_lora.evaluate import EvaluateConfig, EvaluationOutcome, evaluate, format_outcome
from retrieval_lora.evaluation import Comparison
from retrieval_lora.gate import GatePolicy
from retrieval_lora.manifest import write_json_atomic
from retrieval_lora.models import TASKS
from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, Registry
from retrieval_lora.report import comparison_summary
from retrieval_lora.training import LOSSES, SCHEDULES, TrainConfig, json_ready, train_adapter

EPILOG = """examples:
  python -m retrieval_lora.train --task embedder
  python -m retrieval_lora.train --task reranker --qlora --rank 8
  python -m retrieval_lora.train --task embedder --data ../shared/datasets/scifact --epochs 1
  python -m retrieval_lora.train --task embedder --name demo --registry registry --gate-min-gain 0.01
"""


def format_comparison(comparison: Comparison) -> str:
    """A plain-text table: one row per metric, baseline, adapter and the difference."""
    lines = [f"{'metric':<12} {'base':>8} {'adapter':>8} {'delta':>8}   (split: {comparison.split}; "
             f"base = {comparison.baseline_name})"]
    for name, base_value in comparison.baseline.items():
        adapter_value = comparison.adapter[name]
        lines.append(f"{name:<12} {base_value:>8.4f} {adapter_value:>8.4f} {adapter_value - base_value:>+8.4f}")
    return "\n".join(lines)


def add_publish_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for what happens after training: gate policy (`--gate-*`), registry and name."""
    group = parser.add_argument_group("gate and registry (after training)")
    hints = typing.get_type_hints(GatePolicy)
    for fld in dataclasses.fields(GatePolicy):  # prefixed: --alpha is LoRA's alpha here
        kind, help_text = hints[fld.name], f"gate: {fld.metadata['help']} (default: {fld.default})".replace("%", "%%")
        flag = "--gate-" + fld.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f"gate_{fld.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f"gate_{fld.name}", type=kind, metavar=kind.__name__.upper(), help=help_text)
    group.add_argument("--registry", metavar="DIR", help=f"registry folder (default: ${REGISTRY_ENV} or ./{DEFAULT_REGISTRY})")
    group.add_argument("--name", help="adapter name in the registry (default: <dataset folder name>-<task>)")
    group.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                       help="register and promote the adapter when the gate passes (default: on)")


def gate_policy_from_args(args: argparse.Namespace) -> GatePolicy:
    values = {f.name: getattr(args, f"gate_{f.name}") for f in dataclasses.fields(GatePolicy)}
    return GatePolicy(**{name: value for name, value in values.items() if value is not None})


def publish(outcome: EvaluationOutcome, adapter_dir: Path, *, registry: Registry, name: str,
            config: dict) -> str:
    """Register and promote the adapter if the gate passed; a line saying what happened."""
    if not outcome.decision.passed:
        return f"Not registered: the gate rejected the adapter ({outcome.decision.reasons[0]})"
    version = registry.register(name, adapter_dir, metrics=comparison_summary(outcome.comparison),
                                decision=outcome.decision.to_dict(), report_dir=outcome.output, config=config)
    registry.promote(name, version.version, reason=f"gate passed: {outcome.decision.reasons[0]}")
    return f"Registered and promoted {version.spec} in {registry.root} ({version.path})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(TrainConfig, __doc__, prog="python -m retrieval_lora.train", epilog=EPILOG,
                          choices={"task": TASKS, "schedule": SCHEDULES,
                                   "loss": ("auto", *sorted({l for group in LOSSES.values() for l in group}))})
    add_publish_flags(parser)
    args = parser.parse_args(argv)
    config: TrainConfig = config_from_args(TrainConfig, args)
    policy = gate_policy_from_args(args)  # a bad policy fails before hours of training, not after
    run_dir = Path(config.output) / config.task
    started = time.time()
    dataset = load_dataset(config.data)
    print(f"Dataset {dataset.root} ({len(dataset.corpus)} documents, splits {dataset.splits}, "
          f"fingerprint {dataset_fingerprint(dataset)})", flush=True)
    dataset.split_qrels(config.eval_split)  # a missing evaluation split fails before training
    result = train_adapter(config, dataset, run_dir)
    if result.resumed_from:
        print(f"Resumed from {result.resumed_from}")
    print(f"Trained {result.trainable:,} of {result.total:,} parameters "
          f"({100 * result.trainable / result.total:.2f}%) on {result.train_rows} rows", flush=True)
    eval_config = EvaluateConfig(task=config.task, data=config.data, split=config.eval_split, base=config.base,
                                 adapter=str(result.adapter_dir), top_k=config.eval_top_k,
                                 rerank_top_k=config.rerank_top_k, max_seq_length=config.max_seq_length,
                                 output=str(run_dir / "evaluation"), device=config.device, gate=policy)
    outcome = evaluate(eval_config, model=result.model, dataset=dataset)
    print(format_outcome(outcome))
    comparison = outcome.comparison
    write_json_atomic(run_dir / "metrics.json", {
        **comparison_summary(comparison), "decision": outcome.decision.to_dict(), "config": json_ready(config),
        "seconds": round(time.time() - started, 1),
    })
    size_kb = os.path.getsize(result.adapter_dir / "adapter_model.safetensors") / 1024
    print(f"Adapter written to {result.adapter_dir} ({size_kb:,.0f} KB); metrics in {run_dir / 'metrics.json'}")
    print(f"Report: {outcome.output / 'report.html'} (and report.md)")
    if args.register:
        name = args.name or f"{dataset.name}-{config.task}"
        print(publish(outcome, result.adapter_dir, registry=Registry(args.registry), name=name,
                      config=json_ready(config)))
    return 0


if __name__ == "__main__":
    run_cli(main)
