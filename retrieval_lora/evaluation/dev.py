"""A reranker's dev metric during training, measured as the evaluation after training measures it.

`FirstStageDevReranking` is a sentence-transformers evaluator: at each checkpoint it reranks each
dev query's first-stage top `DEV_RERANK_DEPTH` documents with `rerank` and scores the result with
ranx against the split's qrels. A positive the first stage missed counts as missed and a query it
found nothing for scores 0; sentence-transformers' own reranking evaluator scores only the
candidates it is given, so its figure is not the evaluation's.
"""

from __future__ import annotations

import logging

from sentence_transformers.evaluation import SentenceEvaluator

from retrieval_lora.data import RetrievalDataset
from retrieval_lora.errors import TrainingError
from retrieval_lora.evaluation.metrics import score_run
from retrieval_lora.evaluation.runs import rerank
from retrieval_lora.training import DEV_RERANK_DEPTH

logger = logging.getLogger(__name__)
DEV_RERANK_METRICS = ("ndcg@10", "mrr@10")  # ranx names; the first picks the best checkpoint ("eval_dev_ndcg@10")


class FirstStageDevReranking(SentenceEvaluator):
    """nDCG@10 and MRR@10 of `split` after reranking `first_stage` (dev query id -> ranked document
    ids; ids the corpus lacks are skipped). `base_metrics`: the first stage's own order, scored the same way.

    Raises:
        TrainingError: the first stage has no document for any query of the split (nothing to rerank).
    """

    def __init__(self, dataset: RetrievalDataset, split: str, first_stage: dict[str, list[str]]):
        super().__init__()
        self.dataset, self.qrels, self.name = dataset, dataset.split_qrels(split), "dev"
        self.primary_metric = DEV_RERANK_METRICS[0]
        self.run = {}
        for query_id, doc_ids in first_stage.items():
            kept = [doc_id for doc_id in doc_ids if doc_id in dataset.corpus][:DEV_RERANK_DEPTH]
            if query_id in self.qrels and kept:
                self.run[query_id] = {doc_id: float(len(kept) - rank) for rank, doc_id in enumerate(kept)}
        if not self.run:
            raise TrainingError(f"dev split {split!r}: the first stage found no documents for any of its "
                                f"{len(self.qrels)} queries, so there is nothing to rerank; check the corpus, or "
                                "train without a dev evaluation (--dev-split '')")
        self.base_metrics = score_run(self.qrels, self.run, DEV_RERANK_METRICS)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        reranked = rerank(model, self.dataset, self.run, k=DEV_RERANK_DEPTH, show_progress=False)
        metrics = score_run(self.qrels, reranked, DEV_RERANK_METRICS)
        main = DEV_RERANK_METRICS[0]  # self.primary_metric gains the "dev_" prefix below, at the first call
        logger.info("dev %s: first stage %.4f -> reranked %.4f (%d queries)", main, self.base_metrics[main],
                    metrics[main], len(self.qrels))
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics
