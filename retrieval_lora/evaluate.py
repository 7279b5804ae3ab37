"""`python -m retrieval_lora.evaluate`: score a base model, or an adapter against its frozen base.

Without `--adapter`, evaluates the frozen base alone (embedder: FAISS top-k retrieval;
reranker: reranks the first stage) and writes its metrics and a report. With `--adapter` (a
folder, or a registry entry NAME / NAME@N), compares adapter and base on the same queries
with a paired significance test, applies the promotion gate and writes a report folder:
report.md, report.html, per_query_deltas.png, metrics.json, comparison.json, decision.json,
runs/*.trec, config.yaml and manifest.json. `--output` is replaced as a whole, atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from peft import PeftModel

from retrieval_lora.config import config_to_dict, field, save_config
from retrieval_lora.data import RetrievalDataset, dataset_fingerprint, load_dataset
from retrieval_lora.embedding_cache import EmbeddingCache
from retrieval_lora.errors import ConfigError, RegistryError
from retrieval_lora.evaluation import (
    DEFAULT_METRICS, STAT_TESTS, Comparison, Run, check_metrics, compare_with_base, read_trec_run, rerank, retrieve,
    score_run, write_trec_run,
)
from retrieval_lora.gate import GateDecision, GatePolicy, decide
from retrieval_lora.manifest import build_manifest, replace_dir_atomic, staging_dir, write_json_atomic
from retrieval_lora.models import (
    DEFAULT_BASE, TASKS, RetrievalModel, load_adapter, load_base, read_adapter_metadata, transformer_of,
)
from retrieval_lora.registry import Registry
from retrieval_lora.report import metrics_blocks, write_evaluation, write_report

EPILOG = """examples:
  python -m retrieval_lora.evaluate --task embedder --data ../shared/datasets/scifact --output evals/results/base
  python -m retrieval_lora.evaluate --task embedder --data ../shared/datasets/scifact --adapter runs/embedder/adapter
  python -m retrieval_lora.evaluate --task reranker --adapter scifact-reranker@2 --first-stage bm25.trec
  python -m retrieval_lora.evaluate --adapter runs/embedder/adapter --min-gain 0.01 --alpha 0.01 --fail-on-reject
"""


@dataclass
class EvaluateConfig:
    """Every setting of an evaluation; the CLI's flags are generated from these fields."""

    task: str = field("embedder", "what to evaluate: 'embedder' (retrieval) or 'reranker' (rescoring a first stage)")
    data: str | None = field(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: the built-in demo")
    split: str = field("test", "qrels split to evaluate on")
    adapter: str | None = field(None, "adapter folder or registry entry (NAME or NAME@N); omit to evaluate the base alone")
    registry: str | None = field(None, "registry folder for --adapter NAME[@N] (default: $RETRIEVAL_LORA_REGISTRY or ./registry)")
    base: str | None = field(None, "base model (default: the adapter's own base, else the packaged all-MiniLM-L6-v2)")
    first_stage: str | None = field(None, "reranker: TREC run file to rerank (default: the base embedder's top --top-k)")
    baseline_run: str | None = field(None, "TREC run file as baseline: replaces recomputing the frozen base embedder "
                                           "(e.g. the runs/base.trec of an earlier base evaluation), or one more "
                                           "baseline for a reranker (e.g. BM25)")
    baseline_name: str | None = field(None, "name of --baseline-run in the report (default: the file's name)")
    top_k: int = field(100, "documents retrieved per query")
    rerank_top_k: int = field(20, "reranker: rescore this many first-stage documents per query")
    exclude_self: bool = field(False, "drop a query's own id from its results (datasets whose queries are also documents)")
    base_reranker: bool = field(True, "reranker: also score the frozen base reranker and use it as baseline if it beats the first stage")
    metrics: str = field(",".join(DEFAULT_METRICS), "comma-separated ranx metrics; the gate's primary metric must be among them")
    stat_test: str = field("student", "paired significance test: student (t-test) or fisher (randomization)")
    max_seq_length: int | None = field(None, "truncate inputs to this many tokens (default: the model's own limit)")
    batch_size: int = field(64, "texts (or pairs) encoded per batch")
    cache_dir: str | None = field(None, "embedding cache folder: corpus embeddings of an identical model are reused; default: none (the corpus is encoded every time)")
    output: str = field("eval", "report folder to write (replaced as a whole)")
    worst: int = field(10, "number of worst-regressed queries listed in the report")
    save_runs: bool = field(True, "write the runs as TREC files under <output>/runs")
    fail_on_reject: bool = field(False, "exit with status 3 when the gate rejects the adapter")
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)")
    gate: GatePolicy = field(GatePolicy(), "promotion gate policy")

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GatePolicy(**self.gate)
        problems = []
        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        if self.stat_test not in STAT_TESTS:
            problems.append(f"stat_test={self.stat_test!r}: must be one of {', '.join(STAT_TESTS)}")
        for name in ("top_k", "rerank_top_k", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)}: must be > 0")
        if self.first_stage and self.task != "reranker":
            problems.append("first_stage is only used with --task reranker (an embedder retrieves by itself)")
        if self.gate.primary_metric not in self.metric_names:
            problems.append(f"the gate's primary_metric {self.gate.primary_metric!r} is not among metrics "
                            f"{self.metrics!r}; add it to --metrics")
        if problems:
            raise ConfigError("invalid evaluation settings: " + "; ".join(problems))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.metrics.split(",") if name.strip())


@dataclass
class EvaluationOutcome:
    """What an evaluation produced: metrics alone (no adapter) or a comparison and a decision."""

    output: Path
    metrics: dict[str, float]
    comparison: Comparison | None = None
    decision: GateDecision | None = None
    run: Run | None = None  # the base's run, when evaluated alone


def resolve_adapter(spec: str, registry: str | None = None) -> Path:
    """An adapter folder for `spec`: an existing folder, else a registry entry NAME or NAME@N.

    Raises:
        RegistryError: neither a folder nor a registry entry (the message says both were tried).
    """
    if Path(spec).is_dir():
        return Path(spec)
    try:
        return Registry(registry).resolve(spec).adapter_dir
    except RegistryError as exc:
        raise RegistryError(f"--adapter {spec!r} is not a folder, and not a registry entry either: {exc}") from exc


def _load_model(config: EvaluateConfig, adapter_dir: Path | None) -> tuple[RetrievalModel, str]:
    base = config.base or (read_adapter_metadata(adapter_dir).base_model if adapter_dir else DEFAULT_BASE)
    model = load_base(config.task, base, max_seq_length=config.max_seq_length, device=config.device)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, config.task)
    return model, base


def _cache(config: EvaluateConfig) -> EmbeddingCache | None:
    # float32 storage: cached and freshly encoded embeddings give exactly the same scores
    return EmbeddingCache(config.cache_dir, dtype="float32") if config.cache_dir else None


def _base_run(config: EvaluateConfig, model: RetrievalModel, dataset: RetrievalDataset, first_stage: Run | None) -> Run:
    options = dict(k=config.top_k, batch_size=config.batch_size, exclude_self=config.exclude_self,
                   cache=_cache(config))
    if config.task == "embedder":
        return retrieve(model, dataset, config.split, **options)
    if first_stage is None:
        embedder = load_base("embedder", config.base or DEFAULT_BASE, max_seq_length=config.max_seq_length,
                             device=config.device)
        first_stage = retrieve(embedder, dataset, config.split, **options)
    qrels = dataset.split_qrels(config.split)
    first_stage = {qid: ranking for qid, ranking in first_stage.items() if qid in qrels}
    return rerank(model, dataset, first_stage, k=config.rerank_top_k, batch_size=config.batch_size)


def _details(config: EvaluateConfig, dataset: RetrievalDataset, base: str, adapter_dir: Path | None) -> dict:
    return {"dataset": str(dataset.root), "dataset fingerprint": dataset_fingerprint(dataset), "task": config.task,
            "base model": base, "adapter": str(adapter_dir) if adapter_dir else "(none)", "top k": config.top_k,
            "rerank top k": config.rerank_top_k if config.task == "reranker" else "-",
            "first stage": config.first_stage or ("base embedder" if config.task == "reranker" else "-"),
            "baseline run": config.baseline_run or "-",
            "exclude self": config.exclude_self, "max seq length": config.max_seq_length or "model default"}


def evaluate(config: EvaluateConfig, *, model: RetrievalModel | None = None,
             dataset: RetrievalDataset | None = None) -> EvaluationOutcome:
    """Run one evaluation as configured and write its folder to `config.output`.

    `model` (with its adapter already attached, when comparing) and `dataset` may be passed in
    to reuse what the caller has loaded (training does); otherwise they are loaded from config.

    Raises:
        DataError: missing dataset or split. EvaluationError: bad first-stage run file.
        AdapterError: adapter missing, corrupt, or for another task or base. ConfigError: bad metrics.
    """
    check_metrics(config.metric_names)
    dataset = dataset or load_dataset(config.data)
    dataset.split_qrels(config.split)  # a missing split fails before any model is loaded
    first_stage = read_trec_run(config.first_stage, dataset) if config.first_stage else None
    baseline_run = read_trec_run(config.baseline_run, dataset) if config.baseline_run else None
    adapter_dir = resolve_adapter(config.adapter, config.registry) if config.adapter else None
    base = config.base or DEFAULT_BASE
    if model is None:
        model, base = _load_model(config, adapter_dir)
    manifest = build_manifest("evaluation", config_to_dict(config), dataset_fingerprint=dataset_fingerprint(dataset),
                              base_model=base, adapter=str(adapter_dir) if adapter_dir else None)
    details = _details(config, dataset, base, adapter_dir)
    out = Path(config.output)
    if adapter_dir is None and not isinstance(transformer_of(model), PeftModel):
        return _evaluate_alone(config, model, dataset, first_stage, manifest, details)
    comparison = compare_with_base(config.task, model, dataset, config.split, base=base, k=config.top_k,
                                   rerank_k=config.rerank_top_k, batch_size=config.batch_size,
                                   metrics=config.metric_names, stat_test=config.stat_test,
                                   primary_metric=config.gate.primary_metric, exclude_self=config.exclude_self,
                                   first_stage=first_stage, base_reranker=config.base_reranker,
                                   cache=_cache(config), baseline_run=baseline_run,
                                   baseline_name=config.baseline_name or f"baseline run {Path(str(config.baseline_run)).name}")
    decision = decide(comparison.paired, config.gate)
    write_evaluation(out, comparison, decision, title=f"{config.task.capitalize()} adapter vs frozen base on "
                     f"{Path(dataset.root).name}/{config.split}", alpha=config.gate.alpha,
                     primary_metric=config.gate.primary_metric, details=details, worst=config.worst,
                     save_runs=config.save_runs, config=config, extra_files={"manifest.json": manifest})
    return EvaluationOutcome(out, comparison.adapter, comparison, decision)


def _evaluate_alone(config: EvaluateConfig, model: RetrievalModel, dataset: RetrievalDataset, first_stage: Run | None,
                    manifest: dict, details: dict) -> EvaluationOutcome:
    qrels = dataset.split_qrels(config.split)
    run = _base_run(config, model, dataset, first_stage)
    metrics = score_run(qrels, run, config.metric_names)
    name = "frozen base embedder" if config.task == "embedder" else "frozen base reranker"
    target = Path(config.output)
    staging = staging_dir(target)
    write_report(staging, metrics_blocks(metrics, title=f"Frozen base {config.task} on {Path(dataset.root).name}/"
                                         f"{config.split}", split=config.split, num_queries=len(qrels), name=name,
                                         details=details))
    write_json_atomic(staging / "metrics.json", {"split": config.split, "system": name, "num_queries": len(qrels),
                                                 "metrics": metrics})
    write_json_atomic(staging / "manifest.json", manifest)
    save_config(config, staging / "config.yaml")
    if config.save_runs:
        write_trec_run(run, staging / "runs" / "base.trec", "base")
    replace_dir_atomic(staging, target)
    return EvaluationOutcome(target, metrics, run=run)


def format_outcome(outcome: EvaluationOutcome) -> str:
    """Plain-text summary: metrics (with deltas and p-values when compared) and the gate decision."""
    if outcome.comparison is None or outcome.comparison.paired is None:
        return "\n".join(f"{name:<12} {value:.4f}" for name, value in outcome.metrics.items())
    paired = outcome.comparison.paired
    lines = [f"{'metric':<12} {'base':>8} {'adapter':>8} {'delta':>8} {'p':>8}   (split {paired.split}, "
             f"{paired.num_queries} queries; baseline = {paired.baseline_name})"]
    for name, r in paired.metrics.items():
        lines.append(f"{name:<12} {r.baseline:>8.4f} {r.candidate:>8.4f} {r.delta:>+8.4f} {r.p_value:>8.4f}")
    decision = outcome.decision
    if decision is not None:
        lines.append(f"gate: {'PASSED' if decision.passed else 'FAILED'}")
        lines += [f"  - {reason}" for reason in decision.reasons]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(EvaluateConfig, __doc__, prog="python -m retrieval_lora.evaluate", epilog=EPILOG,
                          choices={"task": TASKS, "stat_test": STAT_TESTS})
    config: EvaluateConfig = config_from_args(EvaluateConfig, parser.parse_args(argv))
    started = time.time()
    outcome = evaluate(config)
    print(format_outcome(outcome))
    print(f"Report: {outcome.output / 'report.html'} and report.md ({time.time() - started:.0f}s)")
    if config.fail_on_reject and outcome.decision is not None and not outcome.decision.passed:
        return 3
    return 0


if __name__ == "__main__":
    run_cli(main)
