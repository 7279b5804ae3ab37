"""Content fingerprints of datasets: same content, same fingerprint, whatever the file layout.

Used to skip retraining on unchanged data and recorded in every artifact's manifest.
"""

from __future__ import annotations

import hashlib
import json

from typing import TYPE_CHECKING

from retrieval_lora.data.beir import RetrievalDataset

if TYPE_CHECKING:
    from datasets import Dataset

FINGERPRINT_CHARS = 16


def _digest(chunks) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk.encode("utf-8"))
        hasher.update(b"\x00")
    return hasher.hexdigest()[:FINGERPRINT_CHARS]


def corpus_fingerprint(dataset: RetrievalDataset) -> str:
    """Fingerprint of the corpus alone (ids, titles, texts): keys embedding caches."""
    return _digest(f"{doc_id}\t{doc.title}\t{doc.text}" for doc_id, doc in sorted(dataset.corpus.items()))


def dataset_fingerprint(dataset: RetrievalDataset) -> str:
    """Fingerprint of corpus, queries and every split's qrels, independent of line order.

    It covers what was loaded: qrels rows dropped for naming an unknown id are not part of it
    (they change no training row and no metric), so a published file and a copy with those
    rows removed share a fingerprint; line endings do not matter either.
    """
    def chunks():
        yield "corpus:" + corpus_fingerprint(dataset)
        for query_id, text in sorted(dataset.queries.items()):
            yield f"q\t{query_id}\t{text}"
        for split in dataset.splits:
            for query_id, docs in sorted(dataset.qrels[split].items()):
                for doc_id, grade in sorted(docs.items()):
                    yield f"r\t{split}\t{query_id}\t{doc_id}\t{grade}"
    return _digest(chunks())


def pairs_fingerprint(pairs: Dataset) -> str:
    """Fingerprint of training rows (column names and values, in row order)."""
    return _digest(json.dumps(row, sort_keys=True) for row in pairs)
