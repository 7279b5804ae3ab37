"""Corpus encoding on a real local Dask cluster (2 worker processes) through Prefect's task runner.

The encode-corpus flow plans the batches, writes each shard's texts to its own file, encodes
the shards in the cluster's worker processes (each reads only its shard) and streams them into
the embedding cache; mining then reads that entry and writes exactly the rows a single process
that encodes the corpus itself writes. The streamed cache entry equals the one `store` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.encode import encode_corpus, make_task_runner
from retrieval_lora.data import load_beir
from retrieval_lora.embedding_cache import EmbeddingCache, store_streamed
from retrieval_lora.errors import ConfigError
from retrieval_lora.mining import MiningConfig, mine_hard_negatives
from retrieval_lora.models import load_base
from retrieval_lora.sharding import corpus_texts, encode_planned, encode_shard_file, plan_shards, write_shard_texts

MINING = dict(negatives=2, rank_start=1, rank_end=12, margin=0.0, batch_size=4, show_progress=False)


def test_streamed_cache_entry_equals_a_stored_one(tmp_path: Path) -> None:
    from retrieval_lora.embedding_cache import CacheKey

    vectors = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    key = CacheKey("model", "content", 32, "float16")
    whole, streamed = EmbeddingCache(tmp_path / "a"), EmbeddingCache(tmp_path / "b")
    whole.store(key, vectors)
    store_streamed(streamed, key, (10, 4), [(np.array([7, 8, 9]), vectors[7:]), (np.arange(7), vectors[:7])])
    assert np.array_equal(whole.load(key, 10), streamed.load(key, 10))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    with pytest.raises(ConfigError, match="3 of 10 rows missing"):
        store_streamed(streamed, CacheKey("m", "other", 32, "float16"), (10, 4), [(np.arange(7), vectors[:7])])
    assert len(list((tmp_path / "b").iterdir())) == 2  # the failed entry left nothing behind


def test_a_shard_file_encodes_the_rows_the_whole_corpus_gives(tiny_beir: Path, tmp_path: Path) -> None:
    model = load_base("embedder", max_seq_length=32)
    texts = corpus_texts(load_beir(tiny_beir))
    plan = plan_shards(texts, shards=3, batch_size=4)
    files = write_shard_texts(texts, plan, tmp_path)
    whole = encode_planned(model, texts, batch_size=4)
    for (text_file, positions_file), shard in zip(files, plan.shards):
        assert np.load(positions_file).tolist() == shard.positions
        assert np.array_equal(encode_shard_file(model, text_file), whole[shard.positions])


@pytest.mark.slow
def test_dask_cluster_of_two_worker_processes_gives_the_rows_of_one_process(prefect_api: str, tiny_beir: Path,
                                                                            tmp_path: Path) -> None:
    runner = make_task_runner("dask", workers=2)  # a LocalCluster of 2 worker processes, as `--task-runner dask`
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs.get("processes", True)
    encoded = encode_corpus.with_options(task_runner=runner)(
        data=str(tiny_beir), max_seq_length=32, shards=3, batch_size=MINING["batch_size"],
        cache_dir=str(tmp_path / "cache"), cache_dtype="float32", workdir=str(tmp_path / "work"))
    assert encoded["shards"] == 3 and encoded["rows"] == 18
    assert len(list((tmp_path / "work" / "encode").glob("*/shard-*.jsonl"))) == 3  # each worker read its own file

    dataset, model = load_beir(tiny_beir), load_base("embedder", max_seq_length=32)
    clustered = mine_hard_negatives(model, dataset, "train", MiningConfig(
        cache_dir=str(tmp_path / "cache"), cache_dtype="float32", **MINING))
    alone = mine_hard_negatives(model, dataset, "train", MiningConfig(cache_dir="", **MINING))
    assert clustered.stats["cache"]["corpus"] == "hit" and alone.stats["cache"]["corpus"] == "off"
    assert clustered.rows.to_list() == alone.rows.to_list() and len(alone.rows) > 0
    assert clustered.scores.to_list() == alone.scores.to_list()
