"""An adapter against its frozen base on one split: runs, metrics, paired tests.

For an embedder the baseline is the same model with its adapter switched off. For a reranker
it is the better (on the primary metric) of the first-stage ranking alone and the frozen base
reranker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.embedding_cache import EmbeddingCache
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation.metrics import DEFAULT_METRICS, PairedComparison, compare_runs, score_run
from retrieval_lora.evaluation.runs import Run, check_run_ids, rerank, retrieve
from retrieval_lora.models import RetrievalModel, load_base, merged_for_inference, transformer_of


@dataclass
class Comparison:
    """Metrics of a baseline and of the adapter on the same split, and the runs behind them.

    `paired` holds the significance tests and per-query scores; `baselines` the metrics of
    every baseline considered (for a reranker: the first stage and the frozen base reranker;
    `baseline_name` is the one kept, the better on `primary_metric`).
    """

    split: str
    baseline_name: str
    baseline: dict[str, float]
    adapter: dict[str, float]
    baseline_run: Run
    adapter_run: Run
    paired: PairedComparison | None = None
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    champion: PairedComparison | None = None  # the promoted adapter (baseline) against this candidate, if any


def compare_with_base(task: str, model: RetrievalModel, dataset: RetrievalDataset, split: str, *,
                      base: str, k: int = 100, rerank_k: int = 20, batch_size: int = 64,
                      metrics: tuple[str, ...] = DEFAULT_METRICS, stat_test: str = "student",
                      primary_metric: str | None = None, exclude_self: bool = False, first_stage: Run | None = None,
                      base_reranker: bool = True, show_progress: bool = True,
                      cache: EmbeddingCache | None = None, baseline_run: Run | None = None,
                      baseline_name: str = "baseline run", champion: RetrievalModel | None = None,
                      champion_name: str = "champion") -> Comparison:
    """Score the frozen base and the adapter (on `model`) on `split`, with paired tests.

    Embedder: the same model with its adapter switched off is the baseline. Reranker: the
    adapter reranks the top `rerank_k` of `first_stage` (default: the frozen base embedder's
    top k); the baseline is the better on `primary_metric` (default: the first metric) of that
    first stage alone and the frozen base reranker (`base_reranker=False` skips the latter).
    `cache` (an `EmbeddingCache`) lets retrieval reuse corpus embeddings of an identical model.
    `baseline_run` (named `baseline_name`), e.g. the frozen base's run saved by an earlier
    evaluation or a BM25 run: for an embedder it replaces recomputing the frozen base; for a
    reranker it is one more baseline to beat. `champion` (the promoted adapter, loaded like the
    candidate) is scored on the same queries (and the same first stage) and compared with the
    candidate in `Comparison.champion`.

    Raises:
        DataError: missing split. EvaluationError: a first stage with unknown ids.
        ConfigError: unknown metric or statistical test.
    """
    qrels = dataset.split_qrels(split)
    primary = primary_metric or metrics[0]
    if primary not in metrics:
        raise ConfigError(f"primary metric {primary!r} is not among the metrics {', '.join(metrics)}")
    options = dict(batch_size=batch_size, show_progress=show_progress)
    if baseline_run is not None:
        check_run_ids(baseline_run, dataset, baseline_name)
        baseline_run = {qid: ranking for qid, ranking in baseline_run.items() if qid in qrels}
    if task == "embedder":
        if baseline_run is not None:
            runs = {baseline_name: baseline_run}
        else:
            with transformer_of(model).disable_adapter():
                runs = {"frozen base embedder": retrieve(model, dataset, split, k=k, exclude_self=exclude_self,
                                                         cache=cache, **options)}
        score = lambda m: retrieve(m, dataset, split, k=k, exclude_self=exclude_self, cache=cache, **options)  # noqa: E731
        with merged_for_inference(model):  # same scores, faster than the unmerged adapter
            adapter_run = score(model)
    else:
        if first_stage is None:
            embedder = load_base("embedder", base)
            first_stage = retrieve(embedder, dataset, split, k=k, exclude_self=exclude_self, cache=cache, **options)
        check_run_ids(first_stage, dataset, "the first-stage run")
        first_stage = {qid: ranking for qid, ranking in first_stage.items() if qid in qrels}
        runs = {"first stage alone (no reranking)": first_stage}
        if base_reranker:
            with transformer_of(model).disable_adapter():
                runs["frozen base reranker"] = rerank(model, dataset, first_stage, k=rerank_k, **options)
        if baseline_run is not None:
            runs[baseline_name] = baseline_run
        score = lambda m: rerank(m, dataset, first_stage, k=rerank_k, **options)  # noqa: E731
        with merged_for_inference(model):
            adapter_run = score(model)
    scored = {name: score_run(qrels, run, metrics) for name, run in runs.items()}
    name = max(scored, key=lambda n: scored[n][primary])  # ties keep the first (the cheaper baseline)
    texts = {qid: dataset.queries.get(qid, "") for qid in qrels}
    paired = compare_runs(qrels, runs[name], adapter_run, metrics=metrics, stat_test=stat_test, split=split,
                          baseline_name=name, candidate_name="adapter", query_texts=texts)
    against_champion = None
    if champion is not None:
        with merged_for_inference(champion):
            champion_run = score(champion)
        against_champion = compare_runs(qrels, champion_run, adapter_run, metrics=metrics, stat_test=stat_test,
                                        split=split, baseline_name=champion_name, candidate_name="adapter",
                                        query_texts=texts)
    return Comparison(split, name, scored[name], {m: r.candidate for m, r in paired.metrics.items()},
                      runs[name], adapter_run, paired, scored, against_champion)
