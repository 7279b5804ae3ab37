"""`python -m retrieval_lora.evaluate`: score a base model, or an adapter against its frozen base.

Without `--adapter`, evaluates the frozen base alone (embedder: FAISS top-k retrieval;
reranker: reranks the first stage) and writes its metrics and a report. With `--adapter` (a
folder, or a registry entry NAME / NAME@N), compares adapter and base on the same queries
with a paired significance test, applies the promotion gate and writes a report folder:
report.md, report.html, per_query_deltas.png, metrics.json, comparison.json, decision.json,
runs/*.trec, config.yaml and manifest.json. `--output` is replaced as a whole, atomically.
The adapter is loaded as the server loads it (a QLoRA adapter on the full-precision base), by
the same verb the train command and the flow use (`retrieval_lora.pipeline.evaluate_candidate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from retrieval_lora.config import field
from retrieval_lora.errors import RegistryError
from retrieval_lora.evaluation.settings import STAT_TESTS
from retrieval_lora.gate import GatePolicy
from retrieval_lora.models import DEFAULT_BASE, TASKS
from retrieval_lora.pipeline import DataConfig, EvaluationConfig, check_gate_metric, load_data

EPILOG = """examples:
  python -m retrieval_lora.evaluate --task embedder --data ../shared/datasets/scifact --output evals/results/base
  python -m retrieval_lora.evaluate --task embedder --data ../shared/datasets/scifact --adapter runs/embedder/adapter
  python -m retrieval_lora.evaluate --task reranker --adapter scifact-reranker@2 --first-stage bm25.trec
  python -m retrieval_lora.evaluate --adapter runs/embedder/adapter --gate-min-gain 0.01 --gate-alpha 0.01 --fail-on-reject
"""


@dataclass
class EvaluateCommand:
    """The command's own settings; the sections are the pipeline's (`DataConfig`, `EvaluationConfig`, `GatePolicy`)."""

    task: str = field("embedder", "what to evaluate: 'embedder' (retrieval) or 'reranker' (rescoring a first stage)")
    adapter: str | None = field(None, "adapter folder or registry entry (NAME or NAME@N); omit to evaluate the base alone")
    registry: str | None = field(None, "registry folder for --adapter NAME[@N] (default: $RETRIEVAL_LORA_REGISTRY or ./registry)")
    base: str | None = field(None, "base model (default: the adapter's own base, else the packaged all-MiniLM-L6-v2)")
    max_seq_length: int | None = field(None, "truncate inputs to this many tokens (default: the model's own limit)")
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)")
    output: str = field("eval", "report folder to write (replaced as a whole)")
    fail_on_reject: bool = field(False, "exit with status 3 when the gate rejects the adapter")
    data: DataConfig = field(DataConfig(cache_dir=""), "the dataset", prefix="")
    evaluation: EvaluationConfig = field(EvaluationConfig(), "evaluation", prefix="")
    gate: GatePolicy = field(GatePolicy(), "promotion gate policy", prefix="gate-")

    def __post_init__(self) -> None:
        for name, kind in (("data", DataConfig), ("evaluation", EvaluationConfig), ("gate", GatePolicy)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, kind(**getattr(self, name)))
        if self.task not in TASKS:
            from retrieval_lora.errors import ConfigError

            raise ConfigError(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        check_gate_metric(self.gate, self.evaluation)


def resolve_adapter(spec: str, registry: str | None = None) -> Path:
    """An adapter folder for `spec`: an existing folder, else a registry entry NAME or NAME@N.

    Raises:
        RegistryError: neither a folder nor a registry entry (the message says both were tried).
    """
    if Path(spec).is_dir():
        return Path(spec)
    from retrieval_lora.registry import Registry

    try:
        return Registry(registry).resolve(spec).adapter_dir
    except RegistryError as exc:
        raise RegistryError(f"--adapter {spec!r} is not a folder, and not a registry entry either: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(EvaluateCommand, __doc__, prog="python -m retrieval_lora.evaluate", epilog=EPILOG,
                          choices={"task": TASKS, "stat_test": STAT_TESTS})
    command: EvaluateCommand = config_from_args(EvaluateCommand, parser.parse_args(argv))
    started = time.time()
    dataset = load_data(command.data)
    dataset.split_qrels(command.evaluation.split)  # a missing split fails before any model loads
    adapter_dir = resolve_adapter(command.adapter, command.registry) if command.adapter else None
    from retrieval_lora import pipeline  # the heavy libraries load from here on

    if adapter_dir is None:
        metrics = pipeline.evaluate_base(command.task, command.base or DEFAULT_BASE, dataset, command.evaluation,
                                         command.data, command.output, max_seq_length=command.max_seq_length,
                                         device=command.device, config=command)
        print("\n".join(f"{name:<12} {value:.4f}" for name, value in metrics.items()))
        print(f"Report: {Path(command.output) / 'report.html'} and report.md ({time.time() - started:.0f}s)")
        return 0
    candidate = pipeline.Candidate(command.task, adapter_dir, command.base, command.max_seq_length, command.device)
    comparison = pipeline.evaluate_candidate(candidate, dataset, command.evaluation, command.data,
                                             command.gate.primary_metric)
    decision = pipeline.decide(comparison, command.gate)
    details = pipeline.report_details(dataset, candidate, command.evaluation, command.data)
    report = pipeline.write_report(command.output, comparison, decision, details, command.evaluation,
                                   title=f"{command.task.capitalize()} adapter vs frozen base on "
                                         f"{dataset.name}/{command.evaluation.split}", config=command)
    print(pipeline.format_outcome(comparison, decision))
    print(f"Report: {report.html} and report.md ({time.time() - started:.0f}s)")
    return 3 if command.fail_on_reject and not decision.passed else 0


if __name__ == "__main__":
    run_cli(main)
