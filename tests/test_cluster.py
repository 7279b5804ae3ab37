"""Corpus encoding on a real local Dask or Ray cluster (2 worker processes) through Prefect's task runners.

The encode-corpus flow plans the batches, writes each shard's texts to its own file, encodes
the shards in the cluster's worker processes (each reads only its shard) and streams them into
the embedding cache; mining then reads that entry and writes exactly the rows a single process
that encodes the corpus itself writes. The streamed cache entry equals the one `store` writes.
The Ray tests are skipped where prefect-ray is not installed (extra `ray`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.encode import cluster_address, encode_corpus, make_task_runner
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


def _encode_then_mine_equals_one_process(runner, tiny_beir: Path, tmp_path: Path, **flow_options) -> str:
    """The flow on `runner` fills the cache; mining on that entry == mining that encodes the corpus alone.
    Returns the flow run's id."""
    state = encode_corpus.with_options(task_runner=runner)(
        data=str(tiny_beir), max_seq_length=32, shards=3, batch_size=MINING["batch_size"],
        cache_dir=str(tmp_path / "cache"), cache_dtype="float32", workdir=str(tmp_path / "work"), return_state=True,
        **flow_options)
    encoded = state.result()
    assert encoded["shards"] == 3 and encoded["rows"] == 18
    assert len(list((tmp_path / "work" / "encode").glob("*/shard-*.jsonl"))) == 3  # each worker read its own file

    dataset, model = load_beir(tiny_beir), load_base("embedder", max_seq_length=32)
    clustered = mine_hard_negatives(model, dataset, "train", MiningConfig(
        cache_dir=str(tmp_path / "cache"), cache_dtype="float32", **MINING))
    alone = mine_hard_negatives(model, dataset, "train", MiningConfig(cache_dir="", **MINING))
    assert clustered.stats["cache"]["corpus"] == "hit" and alone.stats["cache"]["corpus"] == "off"
    assert clustered.rows.to_list() == alone.rows.to_list() and len(alone.rows) > 0
    # Scores: equal to float32 rounding. A worker process's encoding can differ in the last bits on some
    # CPUs (seen on an AVX512-BF16/FP16 machine: 1.2e-7; bit-identical on others), never in the rows.
    for ours, theirs in zip(clustered.scores.to_list(), alone.scores.to_list(), strict=True):
        assert {k: v for k, v in ours.items() if not k.endswith(("_score", "_scores"))} == \
            {k: v for k, v in theirs.items() if not k.endswith(("_score", "_scores"))}
        np.testing.assert_allclose(ours["positive_score"], theirs["positive_score"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours["negative_scores"], theirs["negative_scores"], rtol=0, atol=1e-6)
    return str(state.state_details.flow_run_id)


def _completed_shard_runs(flow_run_id: str) -> list:
    """The flow run's completed encode-shard task runs, as this process's Prefect API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="encode-shard")))
    return [run for run in runs if run.state and run.state.is_completed()]


@pytest.mark.slow
def test_dask_cluster_of_two_worker_processes_gives_the_rows_of_one_process(prefect_api: str, tiny_beir: Path,
                                                                            tmp_path: Path) -> None:
    runner = make_task_runner("dask", workers=2)  # a LocalCluster of 2 worker processes, as `--task-runner dask`
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs.get("processes", True)
    _encode_then_mine_equals_one_process(runner, tiny_beir, tmp_path)


@pytest.mark.slow
def test_ray_cluster_of_two_worker_processes_gives_the_rows_of_one_process(prefect_api: str, tiny_beir: Path,
                                                                           tmp_path: Path) -> None:
    pytest.importorskip("prefect_ray", reason="the Ray task runner needs the 'ray' extra (prefect-ray)")
    import ray

    runner = make_task_runner("ray", workers=2)  # a local Ray cluster of 2 CPUs, as `--task-runner ray`
    assert runner.init_kwargs["num_cpus"] == 2 and not runner.address
    assert runner.init_kwargs["runtime_env"]["env_vars"]["PREFECT_API_URL"].rstrip("/") == prefect_api.rstrip("/")
    flow_run_id = _encode_then_mine_equals_one_process(runner, tiny_beir, tmp_path)
    assert not ray.is_initialized()  # the runner shut down the cluster it started
    assert len(_completed_shard_runs(flow_run_id)) == 3  # the workers reported their runs to this process's API



@pytest.mark.slow
def test_ray_reserves_the_gpus_each_shard_asks_for(prefect_api: str) -> None:
    """A local Ray cluster told it has 2 GPUs (logical resources: no GPU is used here). Tasks submitted in
    `shard_resources(1)`, as encode-corpus submits its shards, each hold one GPU, and Ray points each
    one's CUDA_VISIBLE_DEVICES at its own; tasks submitted without it are given none."""
    pytest.importorskip("prefect_ray", reason="the Ray task runner needs the 'ray' extra (prefect-ray)")
    from prefect import flow, task

    from flows.encode import shard_resources

    @task  # defined here, so Ray ships it by value (the workers do not import this test module)
    def visible_gpus(_shard: int) -> str:
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    @flow
    def probe() -> tuple[list[str], list[str]]:
        with shard_resources(1):
            reserved = visible_gpus.map(range(2))
        plain = visible_gpus.map(range(2))
        return [f.result() for f in reserved], [f.result() for f in plain]

    reserved, plain = probe.with_options(task_runner=make_task_runner("ray", workers=2, gpus=2))()
    assert sorted(reserved) == ["0", "1"] and plain == ["", ""]


def test_cluster_settings_are_checked_before_any_cluster_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="must be one of 'threads', 'dask', 'ray'"):
        make_task_runner("spark", workers=2)
    with pytest.raises(ConfigError, match="ray_address='ray://head:10001' is for task_runner='ray', not 'dask'"):
        cluster_address("dask", ray_address="ray://head:10001")
    with pytest.raises(ConfigError, match="dask_address='tcp://s:8786' is for task_runner='dask', not 'threads'"):
        cluster_address("threads", dask_address="tcp://s:8786")
    assert cluster_address("ray", ray_address="auto") == "auto" and cluster_address("threads") is None
    with pytest.raises(ConfigError, match="gpus=2: only a local Ray cluster"):
        make_task_runner("dask", workers=2, gpus=2)
    monkeypatch.setitem(__import__("sys").modules, "prefect_ray", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'retrieval-lora\[ray\]'"):
        make_task_runner("ray", workers=2)


def test_gpus_per_shard_are_refused_without_ray(prefect_api: str, tiny_beir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shard_gpus=1: only the 'ray' task runner reserves GPUs per task"):
        encode_corpus.with_options(task_runner=make_task_runner("threads"))(
            data=str(tiny_beir), shards=2, cache_dir=str(tmp_path / "cache"), workdir=str(tmp_path / "work"),
            shard_gpus=1)
    assert not (tmp_path / "work").exists()  # refused before any work
