"""Sharded encoding: fixed batches cut into shards give bit-identical embeddings, in corpus order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval_lora.data import load_beir
from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached
from retrieval_lora.encoding import encode_texts
from retrieval_lora.errors import ConfigError
from retrieval_lora.models import load_base
from retrieval_lora.sharding import (
    assemble, corpus_texts, encode_planned, encode_shard, plan_shards, store_corpus_embeddings,
)

TEXTS = ["a b c d e f g", "short", "a much longer text than the others, with several clauses in it",
         "medium sized text", "x", "another medium text", "tiny", "the end of the corpus here"]


@pytest.fixture(scope="module")
def model():
    return load_base("embedder", max_seq_length=32)


def test_plan_covers_every_text_once_in_contiguous_batches() -> None:
    plan = plan_shards(TEXTS, shards=3, batch_size=2)
    positions = [p for shard in plan.shards for p in shard.positions]
    assert sorted(positions) == list(range(len(TEXTS)))
    assert [len(shard.batches) for shard in plan.shards] == [2, 1, 1]
    assert all(len(batch) == 2 for shard in plan.shards for batch in shard.batches)
    lengths = [len(TEXTS[p]) for p in positions]
    assert lengths == sorted(lengths, reverse=True)  # longest first, as sentence-transformers batches


def test_plan_never_has_more_shards_than_batches() -> None:
    assert len(plan_shards(TEXTS, shards=50, batch_size=4).shards) == 2
    assert len(plan_shards([], shards=3).shards) == 1
    with pytest.raises(ConfigError, match="shards=0"):
        plan_shards(TEXTS, shards=0)


def test_sharded_embeddings_equal_unsharded_bit_for_bit(model) -> None:
    unsharded = encode_texts(model, TEXTS, batch_size=2, show_progress=False)
    for shards in (1, 2, 3, 4):
        assert np.array_equal(encode_planned(model, TEXTS, batch_size=2, shards=shards), unsharded)


def test_assemble_refuses_parts_that_do_not_fit_the_plan(model) -> None:
    plan = plan_shards(TEXTS, shards=2, batch_size=2)
    parts = [encode_shard(model, TEXTS, shard) for shard in plan.shards]
    with pytest.raises(ConfigError, match="encode every shard"):
        assemble(plan, parts[:1])
    with pytest.raises(ConfigError, match="shard 1 has"):
        assemble(plan, [parts[0], parts[1][:-1]])


def test_stored_shards_are_what_mining_reads_from_the_cache(model, tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    texts = corpus_texts(dataset)
    cache = EmbeddingCache(tmp_path, "float32")
    store_corpus_embeddings(model, dataset, cache, encode_planned(model, texts, batch_size=4, shards=3))
    cached = encode_corpus_cached(model, dataset, cache, batch_size=4, show_progress=False)
    assert cached.cache == "hit"
    assert np.array_equal(cached.vectors, encode_texts(model, texts, batch_size=4, show_progress=False))
    with pytest.raises(ConfigError, match="distinct corpus texts"):
        store_corpus_embeddings(model, dataset, cache, np.zeros((3, 384), dtype=np.float32))
