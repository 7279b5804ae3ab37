"""Building runs (retrieve, rerank), scoring them with ranx, and comparing two of them.

A run is plain data: query id -> {document id -> score}, the same shape as qrels. Retrieval
uses exact inner-product search in FAISS over normalized embeddings (cosine similarity).

- `retrieve`: the top k of the whole corpus per query of a split; `exclude_self=True` drops a
  query's own id from its results (for datasets whose queries are also documents).
- `rerank`: a cross-encoder rescores the top k of a first-stage run (the base embedder's, or a
  TREC run file read with `read_trec_run`, whose ids are checked against the dataset).
- `score_run`: mean metrics (ranx names: "ndcg@10", "mrr@10", "recall@100", "map@100", ...).
- `compare_runs`: baseline vs candidate on the same queries with ranx's paired significance
  test (`ranx.compare`), per-query scores, wins/losses/ties and the worst regressions.
- `compare_with_base`: all of the above for an adapter against its frozen base. For a
  reranker the baseline is the better (on the primary metric) of the first-stage ranking alone
  and the frozen base reranker. With `Baselines`, also the rows a user compares on the same
  queries: BM25 (`lexical.bm25_runs`, bm25s), BM25 + dense hybrids (`fusion`, ranx `fuse`,
  convex weights chosen on the dev split only), and for a reranker each first stage reranked.
- `guard_comparison`: frozen base vs adapter on another dataset (does the adapter forget?).
- `FirstStageDevReranking`: a reranker's dev metric while it trains, scored as the evaluation scores.

A query of the split that is missing from a run scores 0 on every metric (it was not answered).
"""

from retrieval_lora.evaluation.settings import DEFAULT_METRICS, STAT_TESTS
from retrieval_lora.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    **{name: ".comparison" for name in ("Baselines", "Comparison", "SystemRow", "compare_with_base", "guard_comparison")},
    **{name: ".fusion" for name in ("FUSION_METHODS", "FusionChoice", "choose_fusion", "fuse_runs")},
    **{name: ".lexical" for name in ("BM25Settings", "bm25_runs", "build_bm25_index")},
    **{name: ".metrics" for name in ("TIE_TOLERANCE", "MetricResult", "PairedComparison", "QueryDelta", "check_metrics",
                                     "compare_runs", "score_run")},
    **{name: ".runs" for name in ("Run", "check_run_ids", "rerank", "rerank_many", "retrieve", "retrieve_splits",
                                  "search", "ranked", "self_hits")},
    "read_trec_run": ".trec", "write_trec_run": ".trec", "FirstStageDevReranking": ".dev",
})

__all__ = ["DEFAULT_METRICS", "STAT_TESTS"]  # and the lazily loaded names above
