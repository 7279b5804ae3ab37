"""The pipeline's settings: one section per stage, each the stage's own config; no heavy imports.

`SpecializeConfig` is what `python -m retrieval_lora.train` and the `specialize` flow run:

    data        DataConfig       which BEIR folder, how strictly to read it, its embedding cache
    train       TrainConfig      rows, base model, LoRA, loss, schedule, checkpoints
    evaluation  EvaluationConfig split, depth, metrics, paired test, report
    gate        GatePolicy       when a candidate may be promoted
    publish     PublishConfig    registry, name, what to do on rejection

Each default is defined once, in its section; `--help` shows it, flags override a `--config`
file with the same sections. Flags: the data and training settings by their own names
(`--data`, `--epochs`), the others prefixed by their section (`--lora-alpha`, `--eval-top-k`,
`--gate-alpha`), so no two settings share a flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval_lora.config import field
from retrieval_lora.data import RetrievalDataset, load_dataset
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation.settings import DEFAULT_METRICS, FUSION_METHODS, STAT_TESTS
from retrieval_lora.gate import GatePolicy
from retrieval_lora.mining.config import MiningConfig
from retrieval_lora.training.config import TrainConfig

DEFAULT_CACHE_DIR = MiningConfig().cache_dir


@dataclass
class DataConfig:
    """Where the data is and how it is read."""

    path: str | None = field(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: the built-in demo",
                             flag="data")
    strict: bool = field(False, "refuse qrels rows naming documents or queries the folder lacks (default: drop them "
                                "with a warning that counts them; the report says how many were unreachable)",
                         flag="strict-data")
    exclude_self: bool = field(False, "drop a query's own id from its results (datasets whose queries are also "
                                      "documents, e.g. ArguAna)")
    cache_dir: str = field(DEFAULT_CACHE_DIR, "embedding cache folder: mining reuses the frozen base's corpus "
                                              "embeddings across runs; '' turns it off")


@dataclass
class EvaluationConfig:
    """How a candidate is compared with its baselines after training."""

    split: str = field("test", "qrels split to evaluate base and adapter on")
    top_k: int = field(100, "documents retrieved per query")
    rerank_top_k: int = field(20, "reranker: rescore this many first-stage documents per query")
    first_stage: str | None = field(None, "reranker: TREC run file to rerank (default: the base embedder's top --eval-top-k)")
    baseline_run: str | None = field(None, "TREC run file as baseline: replaces recomputing the frozen base embedder "
                                           "(e.g. the runs/base.trec of an earlier base evaluation), or one more "
                                           "baseline for a reranker (e.g. BM25)")
    baseline_name: str | None = field(None, "name of --eval-baseline-run in the report (default: the file's name)")
    base_reranker: bool = field(True, "reranker: also score the frozen base reranker and use it as baseline if it "
                                      "beats the first stage")
    metrics: str = field(",".join(DEFAULT_METRICS), "comma-separated ranx metrics; the gate's primary metric must be among them")
    stat_test: str = field("student", "paired significance test: student (t-test) or fisher (randomization)")
    batch_size: int = field(64, "texts (or pairs) encoded per batch")
    cache: bool = field(False, "also cache the evaluated models' corpus embeddings (float32) under the data "
                               "section's cache folder; default: encode every time")
    worst: int = field(10, "number of worst-regressed queries listed in the report")
    save_runs: bool = field(True, "write the runs as TREC files under <report>/runs")
    bm25: bool = field(True, "also score BM25 (bm25s, stemmed; index cached under the data section's cache folder) "
                             "and BM25 + dense hybrids on the same queries, with paired tests against the adapter")
    bm25_k1: float = field(0.9, "BM25 k1 (Pyserini's BEIR baseline: 0.9)")
    bm25_b: float = field(0.4, "BM25 b (Pyserini's BEIR baseline: 0.4)")
    bm25_stemmer: str = field("english", "PyStemmer (Snowball) algorithm for BM25 terms; '' for none")
    fusion: str = field("convex,rrf", "hybrid methods, comma-separated: convex (min-max normalised weighted sum, "
                                      "the weight chosen on --eval-fusion-split) and/or rrf (reciprocal rank, k=60)")
    fusion_split: str = field("dev", "split the convex fusion weight is chosen on, never the evaluated split; a "
                                     "dataset without it uses equal weights (0.5) and the report says so")
    first_stage_adapter: str | None = field(None, "reranker: an embedder adapter (folder or registry NAME[@N]) whose "
                                                  "retrieval, alone and fused with BM25, is reranked too")
    guard_data: str | None = field(None, "comma-separated BEIR folders on which the frozen base and the adapter are "
                                         "also compared (a forgetting guard; the gate's guard_max_drop applies)")
    guard_split: str = field("test", "qrels split of each guard dataset")

    def __post_init__(self) -> None:
        problems = [f"{name}={getattr(self, name)}: must be > 0"
                    for name in ("top_k", "rerank_top_k", "batch_size") if getattr(self, name) <= 0]
        if self.stat_test not in STAT_TESTS:
            problems.append(f"stat_test={self.stat_test!r}: must be one of {', '.join(STAT_TESTS)}")
        if not self.metric_names:
            problems.append("metrics is empty: give ranx names such as ndcg@10,mrr@10")
        unknown = [m for m in self.fusion_methods if m not in FUSION_METHODS]
        if unknown:
            problems.append(f"fusion={self.fusion!r}: {', '.join(unknown)} unknown; use {', '.join(FUSION_METHODS)}")
        if self.fusion_split == self.split:
            problems.append(f"fusion_split={self.fusion_split!r} is the evaluated split: fusion weights must be "
                            "chosen on other queries (e.g. dev)")
        if self.bm25_k1 < 0 or not 0 <= self.bm25_b <= 1:
            problems.append(f"bm25_k1={self.bm25_k1}, bm25_b={self.bm25_b}: need k1 >= 0 and 0 <= b <= 1")
        if problems:
            raise ConfigError("invalid evaluation settings: " + "; ".join(problems))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.metrics.split(",") if name.strip())

    @property
    def fusion_methods(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.fusion.split(",") if name.strip())

    @property
    def guard_folders(self) -> tuple[str, ...]:
        return tuple(path.strip() for path in (self.guard_data or "").split(",") if path.strip())


@dataclass
class PublishConfig:
    """What happens to a candidate after the gate."""

    register: bool = field(True, "register the adapter and promote it when the gate passes")
    registry: str | None = field(None, "registry folder (default: $RETRIEVAL_LORA_REGISTRY or ./registry)")
    name: str | None = field(None, "adapter name in the registry (default: <dataset folder name>-<task>)")
    fail_on_reject: bool = field(False, "exit with status 3 when the gate rejects the adapter")


def check_gate_metric(gate: GatePolicy, evaluation: EvaluationConfig) -> None:
    """The gate judges a metric, and baselines, the evaluation computes. Raises ConfigError naming the fix."""
    if gate.primary_metric not in evaluation.metric_names:
        raise ConfigError(f"the gate's primary_metric {gate.primary_metric!r} is not among the evaluation metrics "
                          f"{evaluation.metrics!r}; add it to --eval-metrics")
    lexical = [name for name in gate.required_baselines if name in ("bm25", "hybrid")]
    if lexical and not evaluation.bm25:
        raise ConfigError(f"the gate's must_beat names {', '.join(lexical)}, but the evaluation scores no BM25 "
                          "(--no-eval-bm25); turn BM25 on or drop them from --gate-must-beat")
    if "hybrid" in gate.required_baselines and not evaluation.fusion_methods:
        raise ConfigError("the gate's must_beat names hybrid, but the evaluation fuses nothing (--eval-fusion is "
                          "empty); give a fusion method or drop hybrid from --gate-must-beat")


@dataclass
class SpecializeConfig:
    """Every setting of one specialization: data -> rows -> train -> evaluate -> decide -> publish."""

    data: DataConfig = field(DataConfig(), "the dataset", prefix="")
    train: TrainConfig = field(TrainConfig(), "training rows and training", prefix="")
    evaluation: EvaluationConfig = field(EvaluationConfig(), "evaluation after training", prefix="eval-")
    gate: GatePolicy = field(GatePolicy(), "promotion gate", prefix="gate-")
    publish: PublishConfig = field(PublishConfig(), "registry", prefix="")
    output: str = field("runs", "folder for this run's rows, adapter, checkpoints, report and metrics "
                                "(<output>/<task>/)")

    def __post_init__(self) -> None:
        for name, kind in (("data", DataConfig), ("train", TrainConfig), ("evaluation", EvaluationConfig),
                           ("gate", GatePolicy), ("publish", PublishConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, kind(**getattr(self, name)))
        check_gate_metric(self.gate, self.evaluation)


# Inputs are checked here too, before any model or heavy library loads: a bad folder or split fails in a second.

def load_data(data: DataConfig) -> RetrievalDataset:
    """The dataset of `data.path` (None: the built-in demo), read as `data.strict` says."""
    return load_dataset(data.path, strict=data.strict)


def check_splits(dataset: RetrievalDataset, train: TrainConfig, evaluation: EvaluationConfig) -> None:
    """Every split the run will read exists (a named dev split included). Raises DataError naming them."""
    if not train.train_pairs and train.pseudo_queries == "off":
        dataset.split_qrels(train.train_split)
    dev = train.resolved_dev_split(dataset.splits)
    if dev is not None:
        dataset.split_qrels(dev)
    dataset.split_qrels(evaluation.split)
