"""`--teacher hybrid`: label-free pseudo-labels from BM25 fused with the miner.

The teacher is the hybrid pipeline the evaluation reports: BM25 fused with the miner (the frozen
base by default) as `evaluation.fuse_runs` does (min-max normalised per query over each system's top
100, equal weights). No model is loaded and no label is read. Its fused scores live in [0, 1], so
`hybrid_margins` rescales them to the miner's own mean margin on the same rows (in the units of
`training.teacher.MARGIN_SCALE`): the student is asked to reorder its negatives as the hybrid does,
not to stretch every gap. It lives in the pipeline because it joins two stages (mining's rows and
the evaluation's runs) that do not import each other.

    labels, info = hybrid_margins(miner, dataset, split, mined.scores, cache=EmbeddingCache("data/cache"))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval_lora.embedding_cache import EmbeddingCache
from retrieval_lora.evaluation.fusion import FusionChoice, fuse_runs
from retrieval_lora.evaluation.lexical import bm25_runs
from retrieval_lora.evaluation.runs import retrieve
from retrieval_lora.training.teacher import MARGIN_SCALE, margin_labels

HYBRID_TEACHER = "hybrid"  # --teacher hybrid: BM25 + the miner, label-free (not a folder or hub id)
HYBRID_WEIGHT = 0.5  # BM25's weight in the fusion: the evaluation's choice when no dev split picks one
HYBRID_DEPTH = 100  # each system's top k that the fusion normalises over (the evaluation's first-stage depth)


def hybrid_margins(miner: Any, dataset: Any, split: str, scores: Any, *, cache: EmbeddingCache | None = None,
                   show_progress: bool = True) -> tuple[list[float] | list[list[float]], dict]:
    """Per mined row, the hybrid pipeline's margins positive - negative_i (a float with one negative,
    else a list), in the miner's units; and what was done (scale, documents the fusion missed).

    `scores` is the mining result's row-aligned scores (query_id, positive_id, negative_ids,
    positive_score, negative_scores: the miner's cosines). A document outside both systems' top
    `HYBRID_DEPTH` scores 0, as in the evaluation's fusion. `cache`: mining's embedding cache, so the
    miner's corpus embeddings are read, not encoded again (the BM25 index is cached in its folder).
    """
    dense = retrieve(miner, dataset, split, k=HYBRID_DEPTH, show_progress=show_progress, cache=cache)
    lexical = bm25_runs(dataset, [split], k=HYBRID_DEPTH, cache_dir=cache.folder if cache else None)[split]
    choice = FusionChoice("convex", (HYBRID_WEIGHT, 1 - HYBRID_WEIGHT), None, "the hybrid teacher's equal weights")
    fused = fuse_runs([lexical, dense], choice)
    documents = [[row["positive_id"], *row["negative_ids"]] for row in scores]
    hybrid = np.asarray([[fused.get(row["query_id"], {}).get(doc_id, 0.0) for doc_id in ids]
                         for row, ids in zip(scores, documents)], dtype=np.float64)
    own = np.asarray([[row["positive_score"], *row["negative_scores"]] for row in scores], dtype=np.float64)
    hybrid_gap, own_gap = hybrid[:, :1] - hybrid[:, 1:], MARGIN_SCALE * (own[:, :1] - own[:, 1:])
    scale = float(own_gap.mean() / hybrid_gap.mean()) if hybrid_gap.mean() > 0 and own_gap.mean() > 0 \
        else MARGIN_SCALE
    info = {"teacher": HYBRID_TEACHER, "bm25_weight": HYBRID_WEIGHT, "depth": HYBRID_DEPTH, "scale": round(scale, 4),
            "documents_outside_both_top_k": int((hybrid == 0).sum()),
            "rows_reordered": int((hybrid_gap < 0).any(axis=1).sum())}
    return margin_labels((scale * hybrid_gap).tolist()), info
