"""Turning texts into normalized embeddings with a (possibly adapted) embedder.

sentence-transformers already sorts each call's texts by length before batching (less padding),
shows a progress bar and returns numpy; this module fixes the options we always want
(normalized float32 vectors, so inner product == cosine) in one place.
"""

from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from retrieval_lora.data.beir import RetrievalDataset


def encode_texts(model: SentenceTransformer, texts: list[str], *, batch_size: int = 64,
                 show_progress: bool = True, description: str | None = None) -> np.ndarray:
    """Embed `texts` as an (n, dim) float32 array of unit vectors, in input order."""
    if not texts:
        dim = model.get_sentence_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    if description and show_progress:
        print(description, flush=True)
    embeddings = model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress,
                              convert_to_numpy=True, normalize_embeddings=True)
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def encode_corpus(model: SentenceTransformer, dataset: RetrievalDataset, *, batch_size: int = 64,
                  show_progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(document ids in sorted order, their embeddings) for the dataset's whole corpus."""
    ids = sorted(dataset.corpus)
    texts = [dataset.corpus[doc_id].full_text for doc_id in ids]
    return ids, encode_texts(model, texts, batch_size=batch_size, show_progress=show_progress,
                             description=f"Encoding {len(ids)} documents")
