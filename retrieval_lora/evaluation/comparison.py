"""An adapter against what a user could run instead, on one split: runs, metrics, paired tests.

The gate's baseline (`Comparison.paired`): for an embedder the same model with its adapter
switched off; for a reranker the better (on the primary metric) of the first-stage ranking alone
and the frozen base reranker.

With `baselines` (a `Baselines`), the same queries are also scored by the systems a user compares
before shipping (`Comparison.systems`, one row each, in this order):
- embedder: BM25, the frozen base, the adapter, and for each fusion method BM25 + frozen base and
  BM25 + adapter (hybrids, `evaluation.fusion`; convex weights chosen on the dev split only);
- reranker: each first stage (the configured one, BM25, BM25 + frozen base embedder, and with a
  `first_stage_model` that embedder adapter alone and fused with BM25), alone, reranked by the
  frozen base reranker and reranked by the adapter.
Paired tests (`Comparison.tests`, keyed by the baseline row): the adapter against BM25 and the
base; each hybrid of the adapter against the same hybrid of the base; for a reranker the adapter
over each first stage against the frozen reranker over it and against that stage alone (BM25 alone:
against the adapter over the configured stage). A reranker's gate "hybrid" is the better of the
BM25 + frozen base hybrid alone and under the frozen reranker. `best_vs_runner_up` tests the best row on the
primary metric against the second best. Everything is plain data (the flow pickles it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.embedding_cache import EmbeddingCache
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation.fusion import FusionChoice, choose_fusion, fuse_runs
from retrieval_lora.evaluation.lexical import BM25Settings, bm25_runs
from retrieval_lora.evaluation.metrics import DEFAULT_METRICS, PairedComparison, compare_runs, score_run
from retrieval_lora.evaluation.runs import Run, check_run_ids, rerank_many, retrieve_splits
from retrieval_lora.models import RetrievalModel, load_base, merged_for_inference, transformer_of

BM25_ROW = "BM25"
FROZEN_EMBEDDER = "frozen base embedder"


@dataclass(frozen=True)
class Baselines:
    """Which extra systems `compare_with_base` scores: BM25 (`bm25`, None: no lexical rows) and its
    hybrids (`fusion` methods, weights chosen on `dev_split` when the dataset has it)."""

    bm25: BM25Settings | None = BM25Settings()
    fusion: tuple[str, ...] = ("convex", "rrf")
    dev_split: str | None = "dev"
    cache_dir: str | None = None  # BM25 index cache folder


@dataclass
class SystemRow:
    """One system scored on the evaluated split. `role`: bm25, base, adapter, hybrid-base,
    hybrid-adapter (embedder); first-stage, frozen-reranker, adapter-reranker (reranker)."""

    name: str
    role: str
    metrics: dict[str, float]
    first_stage: str | None = None  # reranker rows: the first stage they rerank


@dataclass
class Comparison:
    """Metrics of a baseline and of the adapter on the same split, and the runs behind them.

    `paired` holds the gate's significance tests and per-query scores; `baselines` the metrics of
    every baseline considered for it (for a reranker: the first stage and the frozen base reranker;
    `baseline_name` is the one kept, the better on the primary metric). `systems`, `tests`,
    `fusion` and `best_vs_runner_up`: see the module docstring. `roles` maps a gate baseline
    ("bm25", "hybrid") to its key in `tests`. `guards`: per guard dataset, base vs adapter.
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
    systems: list[SystemRow] = field(default_factory=list)
    system_runs: dict[str, Run] = field(default_factory=dict)
    tests: dict[str, PairedComparison] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    fusion: dict[str, FusionChoice] = field(default_factory=dict)
    best_vs_runner_up: PairedComparison | None = None
    guards: dict[str, PairedComparison] = field(default_factory=dict)
    primary_metric: str | None = None

    def best_system(self) -> SystemRow | None:
        """The row with the highest primary metric (ties: the first, the cheaper system)."""
        if not self.systems:
            return None
        return max(self.systems, key=lambda row: row.metrics[self.primary_metric])


@dataclass
class _Context:
    """What every run of one comparison shares: dataset, splits, depth, options."""

    dataset: RetrievalDataset
    split: str
    dev: str | None
    k: int
    rerank_k: int
    exclude_self: bool
    cache: EmbeddingCache | None
    options: dict
    primary: str
    baselines: Baselines | None
    choices: dict[str, FusionChoice] = field(default_factory=dict)  # hybrid row name -> its fusion
    pairs: dict[str, str] = field(default_factory=dict)  # baseline row -> the candidate row it is tested against
    # gate baseline ("bm25", "hybrid") -> its candidate rows; the best-scoring one (ties: the first) is the gate's
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return [self.split] + ([self.dev] if self.dev else [])

    def dense(self, model) -> dict[str, Run]:
        return retrieve_splits(model, self.dataset, self.splits, k=self.k, exclude_self=self.exclude_self,
                               cache=self.cache, **self.options)


def compare_with_base(task: str, model: RetrievalModel, dataset: RetrievalDataset, split: str, *,
                      base: str, k: int = 100, rerank_k: int = 20, batch_size: int = 64,
                      metrics: tuple[str, ...] = DEFAULT_METRICS, stat_test: str = "student",
                      primary_metric: str | None = None, exclude_self: bool = False, first_stage: Run | None = None,
                      base_reranker: bool = True, show_progress: bool = True,
                      cache: EmbeddingCache | None = None, baseline_run: Run | None = None,
                      baseline_name: str = "baseline run", champion: RetrievalModel | None = None,
                      champion_name: str = "champion", baselines: Baselines | None = None,
                      first_stage_model: RetrievalModel | None = None,
                      first_stage_name: str = "embedder adapter") -> Comparison:
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
    candidate in `Comparison.champion`. `baselines`: the BM25 and hybrid rows (module docstring);
    `first_stage_model`: reranker only, an embedder (adapter) whose retrieval is reranked too.

    Raises:
        DataError: missing split. EvaluationError: a first stage with unknown ids.
        ConfigError: unknown metric or statistical test; the dev split is the evaluated split.
    """
    qrels = dataset.split_qrels(split)
    primary = primary_metric or metrics[0]
    if primary not in metrics:
        raise ConfigError(f"primary metric {primary!r} is not among the metrics {', '.join(metrics)}")
    dev = baselines.dev_split if baselines and baselines.dev_split in dataset.splits else None
    if dev == split:
        raise ConfigError(f"the fusion dev split {dev!r} is the evaluated split: fusion weights would be chosen on the "
                          "queries they are reported on; name another split (--eval-fusion-split)")
    ctx = _Context(dataset, split, dev, k, rerank_k, exclude_self, cache,
                   dict(batch_size=batch_size, show_progress=show_progress), primary, baselines)
    if baseline_run is not None:
        check_run_ids(baseline_run, dataset, baseline_name)
        baseline_run = {qid: ranking for qid, ranking in baseline_run.items() if qid in qrels}
    if task == "embedder":
        rows, baseline_names, score, candidate = _embedder_rows(model, ctx, baseline_run, baseline_name)
    else:
        rows, baseline_names, score, candidate = _reranker_rows(model, base, ctx, first_stage, base_reranker,
                                                                baseline_run, baseline_name, first_stage_model,
                                                                first_stage_name)
    texts = {qid: dataset.queries.get(qid, "") for qid in qrels}

    def test(baseline: str, candidate: str, baseline_label: str | None = None, run: Run | None = None):
        return compare_runs(qrels, rows[baseline][1] if run is None else run, rows[candidate][1], metrics=metrics,
                            stat_test=stat_test, split=split, baseline_name=baseline_label or baseline,
                            candidate_name=candidate, query_texts=texts)

    scored = {name: score_run(qrels, run, metrics) for name, (_, run, _) in rows.items()}
    considered = {label: scored[name] for label, name in baseline_names.items()}
    kept = max(considered, key=lambda label: considered[label][primary])  # ties keep the first (the cheaper one)
    paired = test(baseline_names[kept], candidate, kept)
    paired.candidate_name = "adapter"
    against_champion = None
    if champion is not None:
        with merged_for_inference(champion):
            champion_run = score(champion)
        against_champion = compare_runs(qrels, champion_run, rows[candidate][1], metrics=metrics, stat_test=stat_test,
                                        split=split, baseline_name=champion_name, candidate_name="adapter",
                                        query_texts=texts)
    comparison = Comparison(split, kept, considered[kept], {m: r.candidate for m, r in paired.metrics.items()},
                            rows[baseline_names[kept]][1], rows[candidate][1], paired, considered, against_champion,
                            primary_metric=primary)
    if baselines is not None:
        _add_systems(comparison, rows, scored, test, ctx)
    return comparison


# Row tables: name -> (role, run, first stage), in the order the report shows them.
Rows = dict[str, tuple[str, Run, str | None]]


def _embedder_rows(model, ctx: _Context, baseline_run: Run | None, baseline_name: str):
    if baseline_run is not None:
        base_name, base_runs = baseline_name, {ctx.split: baseline_run}
    else:
        with transformer_of(model).disable_adapter():
            base_name, base_runs = FROZEN_EMBEDDER, ctx.dense(model)
    with merged_for_inference(model):  # same scores, faster than the unmerged adapter
        adapter_runs = ctx.dense(model)
    rows: Rows = {}
    lexical = _bm25(ctx)
    if lexical:
        rows[BM25_ROW] = ("bm25", lexical[ctx.split], None)
    rows[base_name] = ("base", base_runs[ctx.split], None)
    rows["adapter"] = ("adapter", adapter_runs[ctx.split], None)
    if lexical:
        ctx.pairs[BM25_ROW] = "adapter"
        ctx.roles["bm25"] = (BM25_ROW,)
    ctx.pairs[base_name] = "adapter"
    if lexical:
        for method in ctx.baselines.fusion:
            hybrid_base, run_base = _hybrid(ctx, method, lexical, base_runs, base_name)
            hybrid_adapter, run_adapter = _hybrid(ctx, method, lexical, adapter_runs, "adapter")
            rows[hybrid_base], rows[hybrid_adapter] = ("hybrid-base", run_base, None), ("hybrid-adapter", run_adapter, None)
            ctx.pairs[hybrid_base] = hybrid_adapter
            ctx.roles.setdefault("hybrid", (hybrid_base,))
    score = lambda m: ctx.dense(m)[ctx.split]  # noqa: E731  (the champion, scored like the candidate)
    return rows, {base_name: base_name}, score, "adapter"


def _bm25(ctx: _Context) -> dict[str, Run] | None:
    if ctx.baselines is None or ctx.baselines.bm25 is None:
        return None
    return bm25_runs(ctx.dataset, ctx.splits, ctx.baselines.bm25, k=ctx.k, cache_dir=ctx.baselines.cache_dir,
                     exclude_self=ctx.exclude_self)


def _hybrid(ctx: _Context, method: str, lexical: dict[str, Run], dense: dict[str, Run], label: str) -> tuple[str, Run]:
    """(row name, run on the evaluated split): BM25 fused with `dense`, the weight chosen on the dev split only."""
    if ctx.dev and ctx.dev in dense:
        dev_qrels = ctx.dataset.split_qrels(ctx.dev)
        choice = choose_fusion(method, dev_qrels, [lexical[ctx.dev], dense[ctx.dev]], ctx.primary, split=ctx.dev)
    else:
        why = (f"the dataset has no {ctx.baselines.dev_split!r} split" if not ctx.dev
               else f"{label} came from a run file, which has no dev run")
        choice = choose_fusion(method, None, None, ctx.primary, split=None, unavailable=why)
    name = f"BM25 + {label} ({choice.label()})"
    ctx.choices[name] = choice
    return name, fuse_runs([lexical[ctx.split], dense[ctx.split]], choice, ctx.k)


def _reranker_rows(model, base: str, ctx: _Context, first_stage: Run | None, base_reranker: bool,
                   baseline_run: Run | None, baseline_name: str, first_stage_model, first_stage_name: str):
    qrels = ctx.dataset.split_qrels(ctx.split)
    lexical = _bm25(ctx)
    embedder_runs = ctx.dense(load_base("embedder", base)) if first_stage is None or lexical else None
    configured = "first stage" if first_stage is not None else FROZEN_EMBEDDER
    check_run_ids(first_stage or embedder_runs[ctx.split], ctx.dataset, "the first-stage run")
    stages = {configured: {qid: ranking for qid, ranking in (first_stage or embedder_runs[ctx.split]).items()
                           if qid in qrels}}
    if lexical:
        stages[BM25_ROW] = lexical[ctx.split]
        stages.update(_stage_hybrids(ctx, lexical, embedder_runs, FROZEN_EMBEDDER))
    if first_stage_model is not None:
        with merged_for_inference(first_stage_model):
            adapted = ctx.dense(first_stage_model)
        stages[first_stage_name] = adapted[ctx.split]
        if lexical:
            stages.update(_stage_hybrids(ctx, lexical, adapted, first_stage_name))
    with transformer_of(model).disable_adapter():
        frozen = rerank_many(model, ctx.dataset, stages, k=ctx.rerank_k, **ctx.options) if base_reranker else {}
    with merged_for_inference(model):
        adapted_runs = rerank_many(model, ctx.dataset, stages, k=ctx.rerank_k, **ctx.options)
    rows: Rows = {}
    for stage, run in stages.items():
        rows[f"{stage} (no reranking)"] = ("first-stage", run, stage)
        ctx.pairs[f"{stage} (no reranking)"] = f"adapter over {stage}"  # does reranking this first stage help?
        if base_reranker:
            rows[f"frozen base reranker over {stage}"] = ("frozen-reranker", frozen[stage], stage)
            ctx.pairs[f"frozen base reranker over {stage}"] = f"adapter over {stage}"
        rows[f"adapter over {stage}"] = ("adapter-reranker", adapted_runs[stage], stage)
    if lexical:
        ctx.pairs[f"{BM25_ROW} (no reranking)"] = f"adapter over {configured}"
        ctx.roles["bm25"] = (f"{BM25_ROW} (no reranking)",)
        # the hybrid a user could run instead: alone or under the frozen reranker, whichever scores higher
        # (as the base baseline is the better of the first stage and the frozen reranker)
        hybrid = next(stage for stage in stages if stage.startswith(f"BM25 + {FROZEN_EMBEDDER} ("))
        ctx.roles["hybrid"] = tuple(name for name in (f"{hybrid} (no reranking)", f"frozen base reranker over {hybrid}")
                                    if name in rows)
    if baseline_run is not None:
        rows[baseline_name] = ("baseline-run", baseline_run, None)
    considered = {"first stage alone (no reranking)": f"{configured} (no reranking)"}
    if base_reranker:
        considered["frozen base reranker"] = f"frozen base reranker over {configured}"
    if baseline_run is not None:
        considered[baseline_name] = baseline_name
    score = lambda m: rerank_many(m, ctx.dataset, {configured: stages[configured]},  # noqa: E731
                                  k=ctx.rerank_k, **ctx.options)[configured]
    return rows, considered, score, f"adapter over {configured}"


def _stage_hybrids(ctx: _Context, lexical: dict[str, Run], dense: dict[str, Run], label: str) -> dict[str, Run]:
    return dict(_hybrid(ctx, method, lexical, dense, label) for method in ctx.baselines.fusion)


def _add_systems(comparison: Comparison, rows: Rows, scored: dict, test, ctx: _Context) -> None:
    """The user's rows, the paired tests against each baseline row, the fusion choices and the best row."""
    comparison.systems = [SystemRow(name, role, scored[name], stage) for name, (role, _, stage) in rows.items()]
    comparison.system_runs = {name: run for name, (_, run, _) in rows.items()}
    comparison.fusion = dict(ctx.choices)
    comparison.tests = {baseline: test(baseline, candidate) for baseline, candidate in ctx.pairs.items()}
    comparison.roles = {role: max(names, key=lambda name: scored[name][ctx.primary]) for role, names in ctx.roles.items()}
    ordered = sorted(comparison.systems, key=lambda row: -row.metrics[ctx.primary])
    if len(ordered) > 1:
        comparison.best_vs_runner_up = test(ordered[1].name, ordered[0].name)


def guard_comparison(task: str, model: RetrievalModel, dataset: RetrievalDataset, split: str, *, base: str,
                     k: int = 100, rerank_k: int = 20, batch_size: int = 64, metrics: tuple[str, ...] = DEFAULT_METRICS,
                     stat_test: str = "student", exclude_self: bool = False, show_progress: bool = True,
                     cache: EmbeddingCache | None = None) -> PairedComparison:
    """Frozen base vs adapter on another dataset (a forgetting guard): an embedder with its adapter off and
    on; a reranker's frozen base and adapter over the frozen base embedder's top k.

    Raises:
        DataError: missing split.
    """
    comparison = compare_with_base(task, model, dataset, split, base=base, k=k, rerank_k=rerank_k,
                                   batch_size=batch_size, metrics=metrics, stat_test=stat_test,
                                   exclude_self=exclude_self, show_progress=show_progress, cache=cache,
                                   baselines=Baselines(bm25=None, fusion=(), dev_split=None))
    if task == "embedder":
        return comparison.paired
    qrels = dataset.split_qrels(split)
    return compare_runs(qrels, comparison.system_runs[f"frozen base reranker over {FROZEN_EMBEDDER}"],
                        comparison.adapter_run, metrics=metrics, stat_test=stat_test, split=split,
                        baseline_name="frozen base reranker", candidate_name="adapter",
                        query_texts={qid: dataset.queries.get(qid, "") for qid in qrels})
