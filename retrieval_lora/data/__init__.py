"""Data layer: BEIR folders, training pairs, fingerprints and the built-in demo dataset."""

from retrieval_lora.data.beir import Document, Qrels, RetrievalDataset, load_beir
from retrieval_lora.data.demo import demo_dataset_path, load_demo
from retrieval_lora.data.fingerprint import corpus_fingerprint, dataset_fingerprint, pairs_fingerprint
from retrieval_lora.data.lines import DataWarning
from retrieval_lora.data.pairs import load_pairs, pairs_from_qrels
from retrieval_lora.data.qrels import DroppedJudgements

__all__ = [
    "DataWarning", "Document", "DroppedJudgements", "Qrels", "RetrievalDataset", "load_beir", "load_pairs",
    "pairs_from_qrels", "corpus_fingerprint", "dataset_fingerprint", "pairs_fingerprint", "demo_dataset_path",
    "load_demo", "load_dataset",
]


def load_dataset(path: str | None, strict: bool = False) -> RetrievalDataset:
    """Load the BEIR folder at `path`, or the built-in demo dataset when `path` is None.

    `strict` is passed to `load_beir`: qrels rows naming an unknown query or document are
    errors instead of being dropped with a DataWarning. Raises DataError as `load_beir` does.
    """
    return load_demo() if path is None else load_beir(path, strict=strict)
