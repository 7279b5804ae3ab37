"""The pipeline's verbs, called in this order by every shell (train CLI, Prefect flow, benchmarks):

    load_data -> check_splits -> build_rows -> train -> evaluate_candidate -> decide -> write_report -> publish

Each verb takes plain references (paths, configs, a loaded dataset) and returns a small result;
none keeps state between calls. `evaluate_candidate` loads the candidate exactly as the server
does (`load_base` in full precision + `load_adapter`, a QLoRA adapter included), so what the gate
judges is what gets served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datasets import Dataset

from retrieval_lora.data import RetrievalDataset, dataset_fingerprint, load_dataset, load_pairs, pairs_fingerprint
from retrieval_lora.data.pairs import pairs_from_qrels
from retrieval_lora.data.pseudo import PSEUDO_SPLIT, pseudo_queries, with_pseudo_split
from retrieval_lora.embedding_cache import EmbeddingCache
from retrieval_lora.errors import RegistryError
from retrieval_lora.config import save_config
from retrieval_lora.evaluation import (
    Baselines, BM25Settings, Comparison, FirstStageDevReranking, compare_with_base, guard_comparison, ranked,
    read_trec_run, rerank, retrieve, score_run, self_hits, write_trec_run,
)
from retrieval_lora.gate import GateDecision, GatePolicy
from retrieval_lora.gate import decide as gate_decide
from retrieval_lora.manifest import build_manifest, replace_dir_atomic, staging_dir, write_json_atomic
from retrieval_lora.mining import MiningConfig, mine_hard_negatives, save_mining_result
from retrieval_lora.models import load_adapter, load_base, read_adapter_metadata
from retrieval_lora.pipeline.config import DataConfig, EvaluationConfig, PublishConfig
from retrieval_lora.pipeline.hybrid_teacher import HYBRID_TEACHER, hybrid_margins
from retrieval_lora.registry import Registry
from retrieval_lora.report import ReportFiles, comparison_summary, metrics_blocks, system_lines, write_evaluation
from retrieval_lora.report import write_report as write_report_blocks
from retrieval_lora.training import DEV_RERANK_DEPTH, TrainConfig, TrainResult, mining_config, train_adapter
from retrieval_lora.training.distributed import once, world
from retrieval_lora.training.teacher import load_teacher, teacher_margins

DEV_FIRST_STAGE = "dev_first_stage.json"  # beside a reranker's mined rows: the miner's top documents of its dev queries
SELF_HIT_WARNING_SHARE = 0.05  # queries retrieving their own id above this share look like ArguAna-style data


@contextlib.contextmanager
def _quiet_dataset_saves() -> Iterator[None]:
    """`datasets` draws a progress bar per saved table, twice per save: noise for a few hundred rows."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@dataclass
class Rows:
    """Training rows and where they were saved: `path` is a `datasets` folder, `stats` mining's counts."""

    rows: Dataset
    path: Path
    fingerprint: str
    mined: bool
    stats: dict[str, Any] = field(default_factory=dict)


def build_rows(train: TrainConfig, data: DataConfig, dataset: RetrievalDataset, out_dir: str | Path,
               mining: MiningConfig | None = None) -> Rows:
    """The training rows of a run, saved under `out_dir` (`rows/`, plus mining's `scores/`, `stats.json`).

    `train.train_pairs` as given; else the train split's (query, positive) pairs with hard negatives
    mined by the frozen `train.miner or train.base` (`mining`, default `mining_config(train, ...)`,
    cached under `data.cache_dir`); the plain pairs when `train.mines_negatives` is off. Under several
    processes (torchrun, accelerate launch) rank 0 builds and saves them while the others wait, then
    read the saved rows.
    """
    out = Path(out_dir)

    def saved(made: dict[str, Any]) -> Rows:
        return Rows(Dataset.load_from_disk(str(out / "rows")), out / "rows", made["fingerprint"], made["mined"],
                    made["stats"])

    return once(lambda: _build_rows(train, data, dataset, out, mining), share=saved,
                summary=lambda rows: {"fingerprint": rows.fingerprint, "mined": rows.mined, "stats": rows.stats})


def _build_rows(train: TrainConfig, data: DataConfig, dataset: RetrievalDataset, out: Path,
                mining: MiningConfig | None) -> Rows:
    split = train.train_split
    if train.pseudo_queries != "off" and not train.train_pairs:  # no labels: the corpus's own pseudo-queries
        pseudo = pseudo_queries(dataset, train.pseudo_settings(), cache_dir=data.cache_dir or None,
                                show_progress=world().is_main)
        dataset, split = with_pseudo_split(dataset, pseudo), PSEUDO_SPLIT
    if train.train_pairs or not train.mines_negatives:
        rows = load_pairs(train.train_pairs) if train.train_pairs else pairs_from_qrels(dataset, split)
        staging = staging_dir(out)
        with _quiet_dataset_saves():
            rows.save_to_disk(str(staging / "rows"))
        replace_dir_atomic(staging, out)
        return Rows(rows, out / "rows", pairs_fingerprint(rows), mined=False)
    settings = mining or mining_config(train, len(dataset.corpus), cache_dir=data.cache_dir or None)
    miner_name = train.miner or train.base
    miner = load_base("embedder", miner_name, max_seq_length=train.max_seq_length, device=train.device)
    result = mine_hard_negatives(miner, dataset, split, settings)
    result.manifest.update(base=miner_name, max_seq_length=train.max_seq_length)
    if train.teacher == HYBRID_TEACHER:  # label-free pseudo-labels: BM25 + the miner, fused as the evaluation does
        cache = EmbeddingCache(settings.cache_dir, settings.cache_dtype) if settings.cache_dir else None
        labels, info = hybrid_margins(miner, dataset, split, result.scores, cache=cache, show_progress=world().is_main)
        result.rows = result.rows.add_column("label", labels)
        result.manifest.update(teacher=train.teacher, hybrid_teacher=info)
    elif train.teacher:  # pseudo-labels: the teacher's raw-logit margins of each row, for MarginMSE
        teacher = load_teacher(train.teacher, device=train.device)
        result.rows = result.rows.add_column("label", teacher_margins(teacher, result.rows,
                                                                      show_progress=world().is_main))
        result.manifest.update(teacher=train.teacher)
        del teacher
    first_stage = _dev_first_stage(train, data, dataset, miner, settings)
    with _quiet_dataset_saves():
        save_mining_result(result, out, extra={DEV_FIRST_STAGE: first_stage} if first_stage is not None else None)
    rows = result.training_rows()
    return Rows(rows, out / "rows", pairs_fingerprint(rows), mined=True, stats=result.stats)


def _dev_first_stage(train: TrainConfig, data: DataConfig, dataset: RetrievalDataset, miner,
                     settings: MiningConfig) -> dict[str, Any] | None:
    """For a reranker with a dev split: the miner's top `DEV_RERANK_DEPTH` documents of each dev query,
    which its dev evaluation reranks ({"split", "depth", "run": query id -> ranked document ids}).
    The corpus embeddings come from mining's own cache, so only the dev queries are encoded."""
    split = train.resolved_dev_split(dataset.splits) if train.task == "reranker" else None
    if split is None:
        return None
    cache = EmbeddingCache(settings.cache_dir, settings.cache_dtype) if settings.cache_dir else None
    run = retrieve(miner, dataset, split, k=DEV_RERANK_DEPTH, show_progress=False, exclude_self=data.exclude_self,
                   cache=cache)
    return {"split": split, "depth": DEV_RERANK_DEPTH,
            "run": {query_id: [doc_id for doc_id, _ in ranked(ranking)] for query_id, ranking in run.items()}}


def describe_rows(rows: Rows, negatives: int) -> str:
    """One line for a terminal or a Prefect log: how many rows, and what mining dropped."""
    if not rows.mined:
        return f"{len(rows.rows)} training rows (labelled pairs, in-batch negatives only)"
    counts, queries = rows.stats["rows"], rows.stats["queries"]
    return (f"Mined {negatives} negative(s) for {counts['written']} of {counts['possible']} rows "
            f"({queries['mined']} of {queries['labelled']} queries; dropped: {counts['dropped']}); "
            f"stats in {rows.path.parent / 'stats.json'}")


def train(train: TrainConfig, dataset: RetrievalDataset, rows: Rows, run_dir: str | Path,
          callbacks: list | None = None) -> TrainResult:
    """Train the adapter on `rows` into `run_dir` (`adapter/`, `checkpoints/`, `config.yaml`).

    A reranker's warm start reads the first stage's scores of mined rows from mining's `scores/`
    beside them (the miner is the warm start's teacher); other rows are scored by encoding them. Its
    dev evaluation reranks the miner's top documents of the dev queries saved there too
    (`dev_first_stage`, scored by `FirstStageDevReranking` as the evaluation scores); without them,
    its dev positives among sampled documents."""
    reranker = train.task == "reranker"
    first_stage, split = None, None
    if reranker:
        split = train.resolved_dev_split(dataset.splits)
        first_stage = dev_first_stage(rows, split)
        if first_stage is None and split is not None and rows.mined:
            warnings.warn(f"{rows.path.parent}: no {DEV_FIRST_STAGE} for dev split {split!r} beside the mined rows "
                          "(written by an older version, or for another split): the dev metric falls back to each "
                          "dev positive among 20 sampled documents, which tells checkpoints apart poorly; delete the "
                          "folder to mine the rows again", stacklevel=2)
    return train_adapter(train, dataset, Path(run_dir), rows=rows.rows, callbacks=callbacks,
                         teacher=mined_scores(rows) if reranker else None,
                         dev_evaluator=None if first_stage is None else FirstStageDevReranking(dataset, split, first_stage))


def mined_scores(rows: Rows) -> list[list[float]] | None:
    """The miner's cosine scores of each mined row, [positive, negative_1..N], from `scores/` beside
    the rows; None for rows that were not mined (or a folder without scores)."""
    folder = rows.path.parent / "scores"
    if not rows.mined or not folder.is_dir():
        return None
    scores = Dataset.load_from_disk(str(folder))
    return [[positive, *negatives] for positive, negatives in zip(scores["positive_score"], scores["negative_scores"])]


def dev_first_stage(rows: Rows, split: str | None) -> dict[str, list[str]] | None:
    """The miner's ranked document ids per query of the dev `split`, saved beside mined rows for a reranker
    (`DEV_FIRST_STAGE`); None when there is none for that split (rows not mined, or given as a file)."""
    file = rows.path.parent / DEV_FIRST_STAGE
    if split is None or not rows.mined or not file.is_file():
        return None
    saved = json.loads(file.read_text(encoding="utf-8"))
    return saved["run"] if saved.get("split") == split and saved.get("depth") == DEV_RERANK_DEPTH else None


@dataclass
class Candidate:
    """An adapter to judge, as the server will load it: its folder on the float base it names."""

    task: str
    adapter_dir: Path
    base: str | None = None  # default: the base the adapter was trained on
    max_seq_length: int | None = None
    device: str | None = None

    @classmethod
    def trained(cls, train: TrainConfig, adapter_dir: str | Path) -> Candidate:
        return cls(train.task, Path(adapter_dir), train.base, train.max_seq_length, train.device)

    @property
    def base_model(self) -> str:
        return self.base or read_adapter_metadata(self.adapter_dir).base_model


def load_candidate(candidate: Candidate):
    """The candidate's model: the full-precision base with the adapter attached (QLoRA adapters too)."""
    model = load_base(candidate.task, candidate.base_model, max_seq_length=candidate.max_seq_length,
                      device=candidate.device)
    load_adapter(model, candidate.adapter_dir, candidate.task)
    return model


def find_champion(publish: PublishConfig, name: str, candidate_dir: str | Path | None = None) -> str | None:
    """The spec (`name@N`) of the version of `name` promoted now in the registry, or None; also None
    when that version holds the very adapter at `candidate_dir` (a rerun judges nothing new)."""
    promoted = Registry(publish.registry).promoted(name)
    if promoted is None or (candidate_dir is not None and same_adapter(promoted.adapter_dir, candidate_dir)):
        return None
    return promoted.spec


def same_adapter(a: str | Path, b: str | Path) -> bool:
    """Whether two adapter folders hold byte-identical weights."""
    def digest(folder: str | Path) -> str:
        return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()

    return digest(a) == digest(b)


def _first_stage_label(adapter) -> str:
    """The report's name of an embedder adapter used as first stage: with its folder's name, unless that
    is "adapter", the folder every training run saves into ("embedder adapter adapter" said nothing)."""
    name = Path(str(adapter)).name
    return "embedder adapter" if name in ("", "adapter") else f"embedder adapter {name}"


def evaluate_candidate(candidate: Candidate, dataset: RetrievalDataset, evaluation: EvaluationConfig,
                       data: DataConfig, primary_metric: str, *, champion: str | None = None,
                       registry: str | None = None, show_progress: bool = True) -> Comparison:
    """The candidate against its frozen base (and any baseline run) on `evaluation.split`, paired tests.

    With `evaluation.bm25` (the default) the same queries are also scored by BM25 and the BM25 + dense
    hybrids of `evaluation.fusion` (`Comparison.systems`, `.tests`, `.fusion`; weights chosen on
    `evaluation.fusion_split` only); a reranker reranks each first stage, `evaluation.first_stage_adapter`'s
    included. Each folder of `evaluation.guard_data` is scored with base and adapter (`Comparison.guards`).
    `champion` (a registry spec, `find_champion`) is loaded from `registry` as the server loads it and
    scored on the same queries; `Comparison.champion` holds champion vs candidate.

    Raises:
        DataError: missing split. EvaluationError: a first-stage or baseline run with unknown ids.
        AdapterError: adapter missing, corrupt, or for another task or base.
    """
    first_stage = read_trec_run(evaluation.first_stage, dataset) if evaluation.first_stage else None
    baseline_run = read_trec_run(evaluation.baseline_run, dataset) if evaluation.baseline_run else None
    guards = {path: load_dataset(path, strict=data.strict) for path in evaluation.guard_folders}
    for guard in guards.values():  # a missing guard split fails before any model loads
        guard.split_qrels(evaluation.guard_split)
    cache = EmbeddingCache(data.cache_dir, dtype="float32") if evaluation.cache and data.cache_dir else None
    champion_model = None
    if champion is not None:
        promoted = Registry(registry).resolve(champion)
        champion_model = load_candidate(Candidate(candidate.task, promoted.adapter_dir, None,
                                                  candidate.max_seq_length, candidate.device))
    first_stage_model = None
    if evaluation.first_stage_adapter and candidate.task == "reranker":
        folder = _adapter_folder(evaluation.first_stage_adapter, registry)
        first_stage_model = load_candidate(Candidate("embedder", folder, None, candidate.max_seq_length,
                                                     candidate.device))
    model = load_candidate(candidate)
    comparison = compare_with_base(
        candidate.task, model, dataset, evaluation.split, base=candidate.base_model,
        k=evaluation.top_k, rerank_k=evaluation.rerank_top_k, batch_size=evaluation.batch_size,
        metrics=evaluation.metric_names, stat_test=evaluation.stat_test, primary_metric=primary_metric,
        exclude_self=data.exclude_self, first_stage=first_stage, base_reranker=evaluation.base_reranker,
        show_progress=show_progress, cache=cache, baseline_run=baseline_run,
        baseline_name=evaluation.baseline_name or f"baseline run {Path(str(evaluation.baseline_run)).name}",
        champion=champion_model, champion_name=champion or "champion", baselines=baselines_of(evaluation, data),
        first_stage_model=first_stage_model,
        first_stage_name=_first_stage_label(evaluation.first_stage_adapter))
    for path, guard in guards.items():
        comparison.guards[guard.name] = guard_comparison(
            candidate.task, model, guard, evaluation.guard_split, base=candidate.base_model, k=evaluation.top_k,
            rerank_k=evaluation.rerank_top_k, batch_size=evaluation.batch_size, metrics=evaluation.metric_names,
            stat_test=evaluation.stat_test, show_progress=show_progress, cache=cache)
    _warn_self_hits(comparison, data)
    return comparison


def guard_fingerprints(evaluation: EvaluationConfig, data: DataConfig) -> dict[str, str]:
    """Each guard folder's dataset fingerprint (a cache key input: a changed guard is evaluated again)."""
    return {path: dataset_fingerprint(load_dataset(path, strict=data.strict)) for path in evaluation.guard_folders}


def baselines_of(evaluation: EvaluationConfig, data: DataConfig) -> Baselines:
    """The extra rows an evaluation scores (BM25 and its hybrids), as `evaluation` and `data` say."""
    bm25 = BM25Settings(k1=evaluation.bm25_k1, b=evaluation.bm25_b, stemmer=evaluation.bm25_stemmer) \
        if evaluation.bm25 else None
    return Baselines(bm25=bm25, fusion=evaluation.fusion_methods if evaluation.bm25 else (),
                     dev_split=evaluation.fusion_split, cache_dir=data.cache_dir or None)


def _adapter_folder(spec: str, registry: str | None) -> Path:
    """An adapter folder, or the folder of a registry entry NAME[@N]."""
    return Path(spec) if Path(spec).is_dir() else Registry(registry).resolve(spec).adapter_dir


def _warn_self_hits(comparison: Comparison, data: DataConfig) -> None:
    if data.exclude_self:
        return
    hits = self_hits(comparison.adapter_run)
    if hits > SELF_HIT_WARNING_SHARE * max(1, len(comparison.adapter_run)):
        warnings.warn(f"{hits} of {len(comparison.adapter_run)} queries retrieve a document with their own id: the "
                      "queries look like documents of the corpus (as in ArguAna), which inflates the scores; pass "
                      "--exclude-self", stacklevel=2)


def decide(comparison: Comparison, gate: GatePolicy) -> GateDecision:
    """The gate's decision on `comparison` (its champion comparison, the extra baselines of `gate.must_beat`
    and the guard datasets included), one reason per check."""
    baselines = {role: comparison.tests[key] for role, key in comparison.roles.items() if key in comparison.tests}
    return gate_decide(comparison.paired, gate, comparison.champion, baselines=baselines, guards=comparison.guards)


def format_outcome(comparison: Comparison, decision: GateDecision | None) -> str:
    """Plain-text summary: each metric's baseline, adapter, delta and p-value, then the gate's verdict."""
    paired = comparison.paired
    lines = [f"{'metric':<12} {'base':>8} {'adapter':>8} {'delta':>8} {'p':>8}   (split {paired.split}, "
             f"{paired.num_queries} queries; baseline = {paired.baseline_name})"]
    for name, r in paired.metrics.items():
        lines.append(f"{name:<12} {r.baseline:>8.4f} {r.candidate:>8.4f} {r.delta:>+8.4f} {r.p_value:>8.4f}")
    if comparison.systems:
        lines += ["", *system_lines(comparison)]
    if decision is not None:
        lines.append(f"gate: {'PASSED' if decision.passed else 'FAILED'}")
        lines += [f"  - {reason}" for reason in decision.reasons]
    return "\n".join(lines)


def report_details(dataset: RetrievalDataset, candidate: Candidate, evaluation: EvaluationConfig,
                   data: DataConfig, **extra: Any) -> dict[str, Any]:
    """The settings a report states beside its table, unreachable relevance judgements included."""
    dropped = dataset.split_dropped(evaluation.split)
    lexical = baselines_of(evaluation, data).bm25
    extra = {"BM25": lexical.describe() if lexical else "off", "fusion": evaluation.fusion or "-",
             "fusion weight split": evaluation.fusion_split if evaluation.fusion_split in dataset.splits else
             f"{evaluation.fusion_split} (missing: equal weights)",
             "guard datasets": ", ".join(evaluation.guard_folders) or "-", **extra}
    return {"dataset": str(dataset.root), "dataset fingerprint": dataset_fingerprint(dataset),
            "task": candidate.task, "base model": f"{candidate.base_model} (full precision, as served)",
            "adapter": str(candidate.adapter_dir), "top k": evaluation.top_k,
            "rerank top k": evaluation.rerank_top_k if candidate.task == "reranker" else "-",
            "first stage": evaluation.first_stage or ("base embedder" if candidate.task == "reranker" else "-"),
            "baseline run": evaluation.baseline_run or "-", "exclude self": data.exclude_self,
            "max seq length": candidate.max_seq_length or "model default",
            "relevant judgements unreachable": f"{dropped.missing_document_relevant} (documents missing from the corpus)",
            **extra}


def write_report(out_dir: str | Path, comparison: Comparison, decision: GateDecision, details: dict[str, Any],
                 evaluation: EvaluationConfig, *, title: str, config: Any = None) -> ReportFiles:
    """The evaluation folder (report.md/.html, plot, metrics, decision, runs, manifest), written atomically."""
    manifest = build_manifest("evaluation", {"evaluation": dataclasses.asdict(evaluation)},
                              dataset_fingerprint=details.get("dataset fingerprint"),
                              base_model=details.get("base model"), adapter=details.get("adapter"))
    return write_evaluation(out_dir, comparison, decision, title=title, alpha=decision.policy["alpha"],
                            primary_metric=decision.primary_metric, details=details, worst=evaluation.worst,
                            save_runs=evaluation.save_runs, config=config, extra_files={"manifest.json": manifest})


def evaluate_base(task: str, base: str, dataset: RetrievalDataset, evaluation: EvaluationConfig, data: DataConfig,
                  out_dir: str | Path, *, max_seq_length: int | None = None, device: str | None = None,
                  config: Any = None) -> dict[str, float]:
    """The frozen base alone (an embedder retrieves; a reranker rescores the first stage): its metrics,
    and a report folder at `out_dir` (report, metrics.json, manifest, runs/base.trec), written atomically."""
    qrels = dataset.split_qrels(evaluation.split)
    model = load_base(task, base, max_seq_length=max_seq_length, device=device)
    cache = EmbeddingCache(data.cache_dir, dtype="float32") if evaluation.cache and data.cache_dir else None
    options = dict(k=evaluation.top_k, batch_size=evaluation.batch_size, exclude_self=data.exclude_self, cache=cache)
    if task == "embedder":
        run = retrieve(model, dataset, evaluation.split, **options)
    else:
        first_stage = read_trec_run(evaluation.first_stage, dataset) if evaluation.first_stage else retrieve(
            load_base("embedder", base, max_seq_length=max_seq_length, device=device), dataset, evaluation.split,
            **options)
        first_stage = {qid: ranking for qid, ranking in first_stage.items() if qid in qrels}
        run = rerank(model, dataset, first_stage, k=evaluation.rerank_top_k, batch_size=evaluation.batch_size)
    metrics = score_run(qrels, run, evaluation.metric_names)
    name = f"frozen base {task}"
    target, staging = Path(out_dir), staging_dir(Path(out_dir))
    details = {"dataset": str(dataset.root), "dataset fingerprint": dataset_fingerprint(dataset), "task": task,
               "base model": base, "top k": evaluation.top_k, "exclude self": data.exclude_self}
    write_report_blocks(staging, metrics_blocks(metrics, title=f"Frozen base {task} on {dataset.name}/{evaluation.split}",
                                                split=evaluation.split, num_queries=len(qrels), name=name,
                                                details=details))
    write_json_atomic(staging / "metrics.json", {"split": evaluation.split, "system": name,
                                                 "num_queries": len(qrels), "metrics": metrics})
    write_json_atomic(staging / "manifest.json", build_manifest("evaluation", {"evaluation": dataclasses.asdict(evaluation)},
                                                                dataset_fingerprint=dataset_fingerprint(dataset),
                                                                base_model=base, adapter=None))
    if config is not None:
        save_config(config, staging / "config.yaml")
    if evaluation.save_runs:
        write_trec_run(run, staging / "runs" / "base.trec", "base")
    replace_dir_atomic(staging, target)
    return metrics


@dataclass
class Published:
    """What `publish` did: `status` promoted / rejected / not registered, and a line saying so."""

    status: str
    message: str
    spec: str | None = None


def publish(publish: PublishConfig, comparison: Comparison, decision: GateDecision, adapter_dir: str | Path,
            *, name: str, report_dir: str | Path, config: dict[str, Any]) -> Published:
    """Register and promote the adapter when the gate passed; a rejected adapter is not registered
    (so it can never be served, by name or `@latest`).

    The promotion is a compare-and-swap against the champion the decision was made on
    (`decision.champion`): when another version was promoted in between, nothing is registered and
    the status is "stale" (evaluate again against the new champion).
    """
    if not decision.passed:
        return Published("rejected", f"Not registered: the gate rejected the adapter ({decision.reasons[0]})")
    if not publish.register:
        return Published("passed", "Gate passed; not registered (--no-register)")
    registry = Registry(publish.registry)
    expected = int(decision.champion.rsplit("@", 1)[1]) if decision.champion else None
    promoted = registry.promoted(name)
    if promoted is not None and expected is None and same_adapter(promoted.adapter_dir, adapter_dir):
        return Published("promoted", f"Unchanged: {promoted.spec} already holds this adapter", promoted.spec)
    if (promoted.version if promoted else None) != expected:
        return Published("stale", f"Not registered: {name} now promotes {promoted.spec if promoted else 'nothing'}, "
                                  f"not {decision.champion or 'nothing'} as when the gate decided; evaluate again")
    summary = comparison_summary(comparison, decision.policy["alpha"])
    version = registry.register(name, Path(adapter_dir), metrics=summary, decision=decision.to_dict(), report_dir=Path(report_dir), config=config)
    try:
        registry.promote(name, version.version, reason=f"gate passed: {decision.reasons[0]}", expected=expected)
    except RegistryError as exc:  # a promotion landed between the check and the switch
        return Published("stale", f"Registered {version.spec} but did not promote it: {exc}", version.spec)
    return Published("promoted", f"Registered and promoted {version.spec} in {registry.root} ({version.path})",
                     version.spec)


def default_name(dataset: RetrievalDataset, task: str) -> str:
    """The registry name of a run that gives none: `<dataset folder name>-<task>`."""
    return f"{dataset.name}-{task}"

