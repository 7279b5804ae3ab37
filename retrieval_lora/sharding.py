"""Encoding a large corpus in shards that separate workers can encode, with identical results.

Splitting a corpus naively changes which texts share a batch, hence each batch's padded length,
and that changes the low bits of every embedding (the kernels reduce over different shapes).
So a plan fixes the batches first, for the whole corpus, and cuts shards only at batch
boundaries: each shard then encodes exactly the batches an unsharded run encodes, and the
concatenation is bit-for-bit the unsharded result.

    plan = plan_shards(texts, shards=4, batch_size=64)        # cheap, deterministic
    parts = [encode_shard(model, texts, shard) for shard in plan.shards]   # one per worker
    embeddings = assemble(plan, parts)                          # == encode_planned(model, texts, 64)

Batches follow sentence-transformers' own order (longest text first), so padding stays as low
as in a plain `encode_texts` call; the embeddings are normalized float32, like `encoding.py`.

For a dataset, `corpus_texts` gives the texts in the order mining encodes them, and
`store_corpus_embeddings` writes the assembled matrix to the embedding cache under the key
mining looks up: mining then reads the shards' work instead of encoding the corpus itself.

At corpus scale no process needs all texts or all vectors: `write_shard_texts` gives each shard
a file of its own batches (one JSON list of texts per line), a worker encodes only that file
(`encode_shard_file`), and `store_shard_files` streams the shards' vectors into the cache entry,
one shard in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sentence_transformers import SentenceTransformer

from retrieval_lora.data.beir import RetrievalDataset
import json
from pathlib import Path

from retrieval_lora.embedding_cache import (
    CacheKey, EmbeddingCache, corpus_content, distinct_corpus_texts, store_streamed,
)
from retrieval_lora.encoding import encode_texts
from retrieval_lora.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """One worker's share: `batches` lists, per batch, the positions of its texts in the corpus."""

    index: int
    batches: tuple[tuple[int, ...], ...]

    @property
    def positions(self) -> list[int]:
        """Corpus positions of this shard's texts, in the order `encode_shard` returns their rows."""
        return [position for batch in self.batches for position in batch]


@dataclass(frozen=True)
class ShardPlan:
    """Fixed batches of a corpus of `size` texts, grouped into contiguous shards."""

    size: int
    batch_size: int
    shards: tuple[Shard, ...]


def plan_shards(texts: list[str], shards: int, batch_size: int = 64) -> ShardPlan:
    """Cut `texts` into batches (longest first, ties by position) and group them into shards.

    Shards get equal numbers of batches (the first ones one more when it does not divide);
    fewer shards than asked when there are fewer batches than shards.

    Raises:
        ConfigError: `shards` or `batch_size` below 1.
    """
    if shards < 1 or batch_size < 1:
        raise ConfigError(f"shards={shards}, batch_size={batch_size}: both must be >= 1")
    order = np.argsort([-len(text) for text in texts], kind="stable").tolist()
    batches = [tuple(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]
    count = max(1, min(shards, len(batches)))
    per_shard, extra = divmod(len(batches), count)
    groups, start = [], 0
    for index in range(count):
        end = start + per_shard + (1 if index < extra else 0)
        groups.append(Shard(index, tuple(batches[start:end])))
        start = end
    return ShardPlan(len(texts), batch_size, tuple(groups))


def encode_shard(model: SentenceTransformer, texts: list[str], shard: Shard) -> np.ndarray:
    """Embeddings of one shard's texts (rows in `shard.positions` order), batch by planned batch.

    `texts` is the whole corpus, so a worker needs only the corpus and the plan, not a copy
    of its slice. Each planned batch is one `encode` call, so no batch depends on the others.
    """
    parts = [encode_texts(model, [texts[p] for p in batch], batch_size=len(batch), show_progress=False)
             for batch in shard.batches]
    if not parts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    return np.concatenate(parts)


def assemble(plan: ShardPlan, parts: list[np.ndarray]) -> np.ndarray:
    """Put the shards' rows back into corpus order: an (n, dim) float32 array.

    Raises:
        ConfigError: the parts do not match the plan (a missing shard or a wrong row count).
    """
    if len(parts) != len(plan.shards):
        raise ConfigError(f"got {len(parts)} encoded shards for a plan of {len(plan.shards)}; encode every shard")
    for shard, part in zip(plan.shards, parts):
        if len(part) != len(shard.positions):
            raise ConfigError(f"shard {shard.index} has {len(part)} rows, its plan {len(shard.positions)}; "
                              "encode it again with the same plan")
    dim = parts[0].shape[1] if parts else 0
    out = np.zeros((plan.size, dim), dtype=np.float32)
    for shard, part in zip(plan.shards, parts):
        out[shard.positions] = part
    return out


def encode_planned(model: SentenceTransformer, texts: list[str], batch_size: int = 64, shards: int = 1) -> np.ndarray:
    """Encode `texts` through a shard plan in this process; any `shards` gives the same array."""
    plan = plan_shards(texts, shards, batch_size)
    return assemble(plan, [encode_shard(model, texts, shard) for shard in plan.shards])


def corpus_texts(dataset: RetrievalDataset) -> list[str]:
    """The corpus's distinct texts, in the order (and so the rows) of mining's cached corpus matrix."""
    return distinct_corpus_texts(dataset)[2]


def store_corpus_embeddings(model: SentenceTransformer, dataset: RetrievalDataset, cache: EmbeddingCache,
                            vectors: np.ndarray) -> CacheKey:
    """Store `vectors` (rows = `corpus_texts(dataset)`, encoded by `model`) as mining's corpus entry.

    Raises:
        ConfigError: the row count differs from the number of distinct corpus texts.
    """
    expected = len(corpus_texts(dataset))
    if len(vectors) != expected:
        raise ConfigError(f"{len(vectors)} embeddings for {expected} distinct corpus texts; "
                          "encode the texts given by corpus_texts(dataset)")
    key = cache.key(model, corpus_content(dataset))
    cache.store(key, vectors)
    return key


def write_shard_texts(texts: list[str], plan: ShardPlan, folder: str | Path) -> list[tuple[Path, Path]]:
    """Per shard, `<folder>/shard-<n>.jsonl` (its batches, one JSON list of texts per line) and
    `<folder>/shard-<n>.positions.npy` (their corpus rows); each written aside and renamed, and kept
    when already there (the folder is named after the corpus and plan)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for shard in plan.shards:
        text_file, positions_file = folder / f"shard-{shard.index}.jsonl", folder / f"shard-{shard.index}.positions.npy"
        if not (text_file.is_file() and positions_file.is_file()):
            staged = folder / f".shard-{shard.index}.positions.tmp.npy"
            np.save(staged, np.asarray(shard.positions, dtype=np.int64))
            staged.replace(positions_file)
            staged = folder / f".shard-{shard.index}.jsonl.tmp"
            staged.write_text("".join(json.dumps([texts[p] for p in batch]) + "\n" for batch in shard.batches),
                              encoding="utf-8")
            staged.replace(text_file)
        files.append((text_file, positions_file))
    return files


def encode_shard_file(model: SentenceTransformer, text_file: str | Path) -> np.ndarray:
    """Embeddings of a shard file's texts, one planned batch (line) per `encode` call: the rows
    `encode_shard` computes from the whole corpus, reading only this shard's texts."""
    parts = []
    with open(text_file, encoding="utf-8") as lines:
        for line in lines:
            batch = json.loads(line)
            parts.append(encode_texts(model, batch, batch_size=len(batch), show_progress=False))
    if not parts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    return np.concatenate(parts)


def store_shard_files(cache: EmbeddingCache, key: CacheKey, rows: int,
                      shards: list[tuple[str | Path, str | Path]]) -> None:
    """Stream (vectors .npy, positions .npy) pairs, one per shard, into the cache entry `key` of
    `rows` rows (`embedding_cache.store_streamed`): one shard in memory at a time.

    Raises:
        ConfigError: a shard's row count differs from its positions, or rows are missing.
    """
    def parts():
        for vectors_file, positions_file in shards:
            vectors, positions = np.load(vectors_file, mmap_mode="r"), np.load(positions_file)
            if len(vectors) != len(positions):
                raise ConfigError(f"{vectors_file} has {len(vectors)} rows, its plan {len(positions)}; "
                                  "encode it again with the same plan")
            yield positions, vectors

    if not shards:
        raise ConfigError("no encoded shards to store")
    dim = np.load(shards[0][0], mmap_mode="r").shape[1]
    store_streamed(cache, key, (rows, dim), parts())
