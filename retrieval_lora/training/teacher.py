"""Pseudo-labels from a teacher cross-encoder: score margins for MarginMSE, read on raw logits.

With `--teacher`, each mined (query, positive, negative_1..N) row gets a `label`: the teacher's
score of the positive minus its score of each negative (GPL's recipe). The scores are the
teacher's raw logits whatever activation it is configured with: a Sigmoid squashes margins
between confident scores towards 0 (sigmoid(8) - sigmoid(5) = 0.006 where the logits differ by 3).

The student (the embedder) is trained with sentence-transformers' MarginMSELoss on
`MARGIN_SCALE` x cosine, the units our rerankers score in (`models.prior`: 20 x cosine plus the
head), so a teacher margin of 2 asks for a cosine gap of 0.1.

A teacher is a cross-encoder folder or hub id (a trained one-logit head), or one of our reranker
adapter folders (`retrieval_lora.json` beside the PEFT files: loaded on the base it names).

    teacher = load_teacher("runs/reranker/adapter")
    rows = rows.add_column("label", teacher_margins(teacher, rows))

`--teacher hybrid` needs no model and no label: the teacher is the hybrid pipeline the evaluation
reports, BM25 fused with the miner (the frozen base by default) as `fuse_runs` does (min-max
normalised per query over each system's top 100, equal weights). Its fused scores live in [0, 1],
so `hybrid_margins` rescales them to the miner's own mean margin on the same rows: the student is
asked to reorder its negatives as the hybrid does, not to stretch every gap.

    rows = rows.add_column("label", hybrid_margins(miner, dataset, split, mined.scores))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sentence_transformers.util import pairwise_cos_sim

from retrieval_lora.models.prior import cached_views

MARGIN_SCALE = 20.0
HYBRID_TEACHER = "hybrid"  # --teacher hybrid: BM25 + the miner, label-free (not a folder or hub id)
HYBRID_WEIGHT = 0.5  # BM25's weight in the fusion: the evaluation's choice when no dev split picks one
HYBRID_DEPTH = 100  # each system's top k that the fusion normalises over (the evaluation's first-stage depth)


def load_teacher(spec: str, device: str | None = None) -> Any:
    """The teacher CrossEncoder of `spec`, in eval mode: a reranker adapter folder or a cross-encoder."""
    from retrieval_lora.models import METADATA_FILE, load_adapter, load_base, read_adapter_metadata

    if (Path(spec) / METADATA_FILE).is_file():
        metadata = read_adapter_metadata(spec)
        model = load_base("reranker", metadata.base_model, device=device)
        load_adapter(model, spec, "reranker")
    else:
        model = load_base("reranker", spec, device=device)
    return model.eval()


def teacher_margins(teacher: Any, rows: Any, batch_size: int = 32,
                    show_progress: bool = True) -> list[float] | list[list[float]]:
    """Per row, raw-logit margins positive - negative_i: a float with one negative, else a list."""
    negatives = [c for c in rows.column_names if c.startswith("negative")]
    if not negatives:
        raise ValueError("teacher margins need negatives per row: mine them (--negatives >= 1)")
    columns = ["positive", *negatives]
    pairs = [(row["query"], row[column]) for row in rows for column in columns]
    with cached_views(teacher):  # a cosine-prior teacher encodes each query and document view once
        scores = teacher.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                                 convert_to_tensor=True, show_progress_bar=show_progress)
    scores = scores.float().reshape(len(rows), len(columns))
    margins = (scores[:, :1] - scores[:, 1:]).tolist()
    return [row[0] for row in margins] if len(negatives) == 1 else margins


def margin_similarity(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """The student's score in the teacher's units: `MARGIN_SCALE` x cosine."""
    return MARGIN_SCALE * pairwise_cos_sim(queries, documents)


def hybrid_margins(miner: Any, dataset: Any, split: str, scores: Any, *, cache_dir: str | None = None,
                   show_progress: bool = True) -> tuple[list[float] | list[list[float]], dict]:
    """Per mined row, the hybrid pipeline's margins positive - negative_i (a float with one negative,
    else a list), in the miner's units; and what was done (scale, documents the fusion missed).

    `scores` is the mining result's row-aligned scores (query_id, positive_id, negative_ids,
    positive_score, negative_scores: the miner's cosines). A document outside both systems' top
    `HYBRID_DEPTH` scores 0, as in the evaluation's fusion.
    """
    import numpy as np

    from retrieval_lora.embedding_cache import EmbeddingCache
    from retrieval_lora.evaluation.fusion import FusionChoice, fuse_runs
    from retrieval_lora.evaluation.lexical import bm25_runs
    from retrieval_lora.evaluation.runs import retrieve

    cache = EmbeddingCache(cache_dir) if cache_dir else None
    dense = retrieve(miner, dataset, split, k=HYBRID_DEPTH, show_progress=show_progress, cache=cache)
    lexical = bm25_runs(dataset, [split], k=HYBRID_DEPTH, cache_dir=cache_dir)[split]
    choice = FusionChoice("convex", (HYBRID_WEIGHT, 1 - HYBRID_WEIGHT), None, "the hybrid teacher's equal weights")
    fused = fuse_runs([lexical, dense], choice)
    documents = [[row["positive_id"], *row["negative_ids"]] for row in scores]
    hybrid = np.asarray([[fused.get(row["query_id"], {}).get(doc_id, 0.0) for doc_id in ids]
                         for row, ids in zip(scores, documents)], dtype=np.float64)
    own = np.asarray([[row["positive_score"], *row["negative_scores"]] for row in scores], dtype=np.float64)
    hybrid_gap, own_gap = hybrid[:, :1] - hybrid[:, 1:], MARGIN_SCALE * (own[:, :1] - own[:, 1:])
    scale = float(own_gap.mean() / hybrid_gap.mean()) if hybrid_gap.mean() > 0 and own_gap.mean() > 0 \
        else MARGIN_SCALE
    margins = (scale * hybrid_gap).tolist()
    info = {"teacher": HYBRID_TEACHER, "bm25_weight": HYBRID_WEIGHT, "depth": HYBRID_DEPTH, "scale": round(scale, 4),
            "documents_outside_both_top_k": int((hybrid == 0).sum()),
            "rows_reordered": int((hybrid_gap < 0).any(axis=1).sum())}
    return ([row[0] for row in margins] if hybrid.shape[1] == 2 else margins), info
