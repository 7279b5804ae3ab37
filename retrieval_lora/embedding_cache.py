"""An on-disk cache of embeddings, keyed by everything that changes them.

Encoding is the expensive part of mining and of evaluation on a CPU, so each set of texts is
encoded once per model state and reused. A cache entry is found by a digest of:

- the model identity (`model_identity`): the base fingerprint, a hash of a strided sample of
  every weight tensor (so an attached, trained or merged adapter is a different model), the
  adapter state (active, disabled, merged) and the configs of the modules after the
  transformer (pooling, normalization);
- the content: the corpus fingerprint, or a digest of the texts themselves;
- the model's max sequence length and the storage dtype.

Entries are two files, `<digest>.npy` (the vectors) and `<digest>.json` (the key and the shape,
written last, so a reader never trusts a half-written entry); both are written to a temporary
name and renamed into place. float16 storage (the default) halves the disk and read cost; the
vectors handed back are always the stored values as float32, so a first run (miss) and a second
run (hit) compute exactly the same scores.

What is NOT detected: a weight change confined to elements the strided sample skips (sparse
updates of a few elements). LoRA, full fine-tuning and merging all change every sampled tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.data.fingerprint import corpus_fingerprint
from retrieval_lora.encoding import encode_texts
from retrieval_lora.errors import ConfigError
from retrieval_lora.manifest import write_json_atomic
from retrieval_lora.models import base_fingerprint

CACHE_FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32")
SAMPLED_VALUES = 4096  # per weight tensor; enough to see any dense update, cheap for any model size


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLED_VALUES)
    return flat[::stride][:SAMPLED_VALUES].contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _adapter_state(model: SentenceTransformer) -> list[str]:
    """Active adapters and whether they are disabled or merged, per distinct LoRA layer state."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    states = {f"{sorted(m.active_adapters)}:{m.disable_adapters}:{m.merged}"
              for m in model.modules() if isinstance(m, BaseTunerLayer)}
    return sorted(states)


def model_identity(model: SentenceTransformer) -> str:
    """A digest that changes whenever the embeddings `model` produces can change.

    Combines `models.base_fingerprint`, a strided sample of every tensor in the state dict
    (adapter weights included), the adapter state and the configs of the modules after the
    transformer. Costs a fraction of a second for MiniLM-sized models.
    """
    hasher = hashlib.sha256(f"base={base_fingerprint(model)};".encode())
    for name, tensor in model.state_dict().items():
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        hasher.update(_tensor_sample(tensor))
    hasher.update(json.dumps(_adapter_state(model)).encode())
    for module in list(model.children())[1:]:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        hasher.update(f"{type(module).__name__}:{json.dumps(config, sort_keys=True, default=str)};".encode())
    return hasher.hexdigest()[:16]


def texts_fingerprint(texts: list[str]) -> str:
    """Digest of a list of texts, order included."""
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(text.encode("utf-8"))
        hasher.update(b"\x00")
    return hasher.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Everything an entry depends on. `content` names the texts (e.g. 'corpus:<fingerprint>')."""

    model: str
    content: str
    max_seq_length: int | None
    dtype: str

    @property
    def digest(self) -> str:
        payload = json.dumps({"format": CACHE_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """A folder of cached embedding matrices (see the module docstring for the key and layout)."""

    def __init__(self, folder: str | Path, dtype: str = "float16") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"cache dtype={dtype!r}: must be one of {', '.join(STORAGE_DTYPES)}")
        self.folder = Path(folder).expanduser()
        self.dtype = dtype

    def key(self, model: SentenceTransformer, content: str, identity: str | None = None) -> CacheKey:
        """The key of `content` encoded by `model` (pass `identity` to skip recomputing it)."""
        return CacheKey(identity or model_identity(model), content, model.max_seq_length, self.dtype)

    def load(self, key: CacheKey, rows: int) -> np.ndarray | None:
        """The cached float32 matrix for `key`, or None when absent or not usable (a warning says why)."""
        vectors, meta = self.folder / f"{key.digest}.npy", self.folder / f"{key.digest}.json"
        if not meta.is_file() or not vectors.is_file():
            return None
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8"))
            array = np.load(vectors, allow_pickle=False)
        except (OSError, ValueError) as exc:
            warnings.warn(f"embedding cache entry {vectors} is unreadable ({exc}); encoding again", stacklevel=2)
            return None
        if recorded.get("key") != asdict(key) or array.shape[0] != rows or list(array.shape) != recorded.get("shape"):
            warnings.warn(f"embedding cache entry {vectors} does not match its key or {rows} rows; encoding again",
                          stacklevel=2)
            return None
        return np.ascontiguousarray(array, dtype=np.float32)

    def store(self, key: CacheKey, embeddings: np.ndarray) -> np.ndarray:
        """Write `embeddings` under `key`; return them as stored (rounded to the storage dtype), float32."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = np.ascontiguousarray(embeddings, dtype=self.dtype)
        _save_npy_atomic(self.folder / f"{key.digest}.npy", stored)
        meta = {"key": asdict(key), "shape": list(stored.shape), "format": CACHE_FORMAT_VERSION}
        write_json_atomic(self.folder / f"{key.digest}.json", meta)
        return np.ascontiguousarray(stored, dtype=np.float32)


def store_streamed(cache: EmbeddingCache, key: CacheKey, shape: tuple[int, int], parts) -> None:
    """Write an entry of `shape` under `key` from `parts`, an iterable of (row positions, vectors), one
    part in memory at a time: the rows go straight into the entry's memory-mapped file (so an entry
    larger than memory can be written), which is renamed into place once every row is written, and
    the key file comes last, as with `EmbeddingCache.store`. The stored values are the same.

    Raises:
        ConfigError: the parts do not cover every row exactly once.
    """
    cache.folder.mkdir(parents=True, exist_ok=True)
    final = cache.folder / f"{key.digest}.npy"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=cache.folder)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=cache.dtype, shape=shape)
        seen = np.zeros(shape[0], dtype=bool)
        for positions, vectors in parts:
            if seen[positions].any():
                raise ConfigError(f"rows written twice while storing {final.name}; encode every shard once")
            out[positions] = vectors
            seen[positions] = True
        if not seen.all():
            raise ConfigError(f"{int((~seen).sum())} of {shape[0]} rows missing while storing {final.name}; "
                              "encode every shard")
        out.flush()
        del out
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(cache.folder / f"{key.digest}.json",
                      {"key": asdict(key), "shape": list(shape), "format": CACHE_FORMAT_VERSION})


def encode_texts_cached(model: SentenceTransformer, texts: list[str], cache: EmbeddingCache | None, *,
                        content: str | None = None, identity: str | None = None, batch_size: int = 64,
                        show_progress: bool = True, description: str | None = None) -> tuple[np.ndarray, str]:
    """Embeddings of `texts` (float32, normalized), read from `cache` when present.

    `content` names the texts in the key (default: a digest of the texts). Returns the matrix
    and what happened: "hit", "miss" (encoded and stored) or "off" (no cache).
    """
    if cache is None:
        return encode_texts(model, texts, batch_size=batch_size, show_progress=show_progress,
                            description=description), "off"
    key = cache.key(model, content or f"texts:{texts_fingerprint(texts)}", identity)
    cached = cache.load(key, len(texts))
    if cached is not None:
        return cached, "hit"
    encoded = encode_texts(model, texts, batch_size=batch_size, show_progress=show_progress, description=description)
    return cache.store(key, encoded), "miss"


@dataclass
class CorpusEmbeddings:
    """A corpus encoded once per distinct text.

    `vectors[rows[i]]` is the embedding of document `ids[i]`; `texts[j]` is the text of
    `vectors[j]`, and `first_ids[j]` the first (sorted) document id that has that text.
    Documents with identical texts share a row, so they are encoded once and a search never
    returns the same text twice.
    """

    ids: list[str]
    rows: np.ndarray
    vectors: np.ndarray
    texts: list[str]
    first_ids: list[str]
    cache: str

    def row_of(self) -> dict[str, int]:
        """Map document id -> row of `vectors`."""
        return dict(zip(self.ids, self.rows.tolist()))

    def per_document(self) -> tuple[list[str], np.ndarray]:
        """(ids, one vector per id): the shape `encoding.encode_corpus` returns."""
        return self.ids, self.vectors[self.rows]


def distinct_corpus_texts(dataset: RetrievalDataset) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(sorted ids, row of each id, distinct texts in first-seen order, first id of each text).

    The texts, in this order, are what `encode_corpus_cached` encodes and caches (also used by
    `sharding` to fill the same cache entry from shards encoded elsewhere).
    """
    ids = sorted(dataset.corpus)
    text_row: dict[str, int] = {}
    rows = np.empty(len(ids), dtype=np.int64)
    texts, first_ids = [], []
    for position, doc_id in enumerate(ids):
        text = dataset.corpus[doc_id].full_text
        if text not in text_row:
            text_row[text] = len(texts)
            texts.append(text)
            first_ids.append(doc_id)
        rows[position] = text_row[text]
    return ids, rows, texts, first_ids


def corpus_content(dataset: RetrievalDataset) -> str:
    """The `content` part of the cache key of the corpus's distinct texts."""
    return f"corpus-distinct:{corpus_fingerprint(dataset)}"


def encode_corpus_cached(model: SentenceTransformer, dataset: RetrievalDataset, cache: EmbeddingCache | None, *,
                         identity: str | None = None, batch_size: int = 64,
                         show_progress: bool = True) -> CorpusEmbeddings:
    """Encode each distinct document text of `dataset` once, keyed by the corpus fingerprint."""
    ids, rows, texts, first_ids = distinct_corpus_texts(dataset)
    vectors, status = encode_texts_cached(
        model, texts, cache, content=corpus_content(dataset), identity=identity,
        batch_size=batch_size, show_progress=show_progress,
        description=f"Encoding {len(texts)} distinct texts of {len(ids)} documents")
    return CorpusEmbeddings(ids, rows, vectors, texts, first_ids, status)
