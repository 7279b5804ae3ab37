"""Pseudo-labels from a teacher cross-encoder: score margins for MarginMSE, read on raw logits.

With `--teacher`, each mined (query, positive, negative_1..N) row gets a `label`: the teacher's
score of the positive minus its score of each negative (GPL's recipe). The scores are the
teacher's raw logits whatever activation it is configured with: a Sigmoid squashes margins
between confident scores towards 0 (sigmoid(8) - sigmoid(5) = 0.006 where the logits differ by 3).

The student (the embedder) is trained with sentence-transformers' MarginMSELoss on
`MARGIN_SCALE` x cosine, the units our rerankers score in (`models.prior`: 20 x cosine plus the
head), so a teacher margin of 2 asks for a cosine gap of 0.1.

A teacher is a cross-encoder folder or hub id (a trained one-logit head), one of our reranker
adapter folders (`retrieval_lora.json` beside the PEFT files: loaded on the base it names), or a
sentence-transformers embedder (a larger bi-encoder to distil): loaded as a reranker it has no
head, so it scores with the cosine prior alone, `MARGIN_SCALE` x its own cosine, the student's units.

    teacher = load_teacher("runs/reranker/adapter")
    rows = rows.add_column("label", teacher_margins(teacher, rows))

`--teacher hybrid` (BM25 fused with the miner, no model and no label) is built from the evaluation's
runs, a later stage than training: see `retrieval_lora.pipeline.hybrid_teacher`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sentence_transformers.util import pairwise_cos_sim

from retrieval_lora.models.prior import cached_views

MARGIN_SCALE = 20.0


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
    return margin_labels((scores[:, :1] - scores[:, 1:]).tolist())


def margin_labels(margins: list[list[float]]) -> list[float] | list[list[float]]:
    """Rows x negatives margins as MarginMSELoss reads its label column: a float per row with one
    negative, else a list per row."""
    return [row[0] for row in margins] if margins and len(margins[0]) == 1 else margins


def margin_similarity(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """The student's score in the teacher's units: `MARGIN_SCALE` x cosine."""
    return MARGIN_SCALE * pairwise_cos_sim(queries, documents)
