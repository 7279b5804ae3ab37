"""The `encode-corpus` flow: a corpus encoded in shards, mapped over tasks, into the embedding cache.

    python -m flows.encode --data ../shared/datasets/scifact --shards 8
    python -m flows.encode --data ../shared/datasets/scifact --shards 8 --task-runner dask
    python -m flows.encode --data ... --shards 64 --task-runner dask --dask-address tcp://scheduler:8786

The scale-out seam of `specialize`: the frozen base's corpus embeddings are what mining needs
first and what costs most. `plan-shards` fixes the batches of `retrieval_lora.sharding` and writes
each shard's texts to a file of its own; each `encode-shard` task loads the base itself (tasks get
paths, never models), reads only its shard's file and writes its vectors to `shard-<n>.npy`; no
worker holds the corpus. `store-embeddings` streams the shards, one at a time, into mining's
embedding cache under the key mining looks up (the entry is written memory-mapped, so it may be
larger than memory), where `mine_hard_negatives` finds it instead of encoding the corpus again:
bit-for-bit what one process would compute.

Task runners: threads in this process by default (`ThreadPoolTaskRunner`), or Dask
(`prefect_dask.DaskTaskRunner`): a local cluster of worker processes, which report to this
process's Prefect API, or an existing cluster at `--dask-address`, whose workers need
`PREFECT_API_URL` set to a Prefect server (`prefect server start`). Dask workers must be able
to import `flows` and `retrieval_lora` and read the dataset and work folders.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Literal, TypedDict

import flows  # noqa: F401  (telemetry off before Prefect loads)
import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.caching import key_parameter, result_storage, step_key
from flows.tasks import PERSISTED, load_data, load_checked, not_a_setting_error
from retrieval_lora.embedding_cache import EmbeddingCache, corpus_content
from retrieval_lora.errors import ConfigError
from retrieval_lora.models import DEFAULT_BASE, DEFAULT_MAX_SEQ_LENGTH, load_base
from retrieval_lora.pipeline import DEFAULT_CACHE_DIR, DataConfig
from retrieval_lora.sharding import corpus_texts, encode_shard_file, plan_shards, store_shard_files, write_shard_texts

RunnerKind = Literal["threads", "dask"]


def make_task_runner(kind: RunnerKind = "threads", workers: int | None = None, address: str | None = None) -> TaskRunner:
    """Threads in this process, or Dask (a local cluster of `workers` processes, or the one at `address`).

    Raises:
        ConfigError: an unknown kind, or Dask asked for without prefect-dask installed.
    """
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise ConfigError(f"task_runner={kind!r}: must be 'threads' or 'dask'")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("task_runner='dask' needs prefect-dask: pip install 'retrieval-lora[dask]'") from exc
    if address:
        return DaskTaskRunner(address=address)
    # Worker processes report their task runs to this process's API (without it, each worker
    # would start a temporary API server of its own, and its runs would not show in the UI).
    # One thread per worker: torch already uses every core of a worker for one batch.
    api_url = str(get_client(sync_client=True).api_url)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1,
                                          "env": {"PREFECT_API_URL": api_url}})


class EncodedCorpus(TypedDict):
    cache_dir: str
    digest: str
    rows: int
    shards: int


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


class ShardPlanRef(TypedDict):
    content: str  # the corpus part of the cache key
    rows: int  # distinct texts
    texts: list[str]  # per shard, its batches of texts (one JSON list per line)
    positions: list[str]  # per shard, the corpus rows of its texts (.npy)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_corpus_shards(data_path: str, data_fingerprint: str, shards: int, batch_size: int,
                       out_dir: str) -> ShardPlanRef:
    """Fix the corpus's batches, cut them into at most `shards` shards, write each shard's texts to its own file."""
    dataset = load_checked(DataConfig(), data_path, data_fingerprint)
    texts = corpus_texts(dataset)
    files = write_shard_texts(texts, plan_shards(texts, shards, batch_size), out_dir)
    return ShardPlanRef(content=corpus_content(dataset), rows=len(texts), texts=[str(t) for t, _ in files],
                        positions=[str(p) for _, p in files])


def _shard_key(_context: object, parameters: dict) -> str:
    return f"encode-shard-{parameters['key']}-{parameters['shard']}"


@task(name="encode-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=not_a_setting_error,
      cache_key_fn=_shard_key, **PERSISTED)
def encode_corpus_shard(key: str, texts: str, base: str, max_seq_length: int | None, shard: int, out_dir: str) -> str:
    """Encode the shard whose texts are in `texts` (its planned batches); write its rows to `<out_dir>/shard-<n>.npy`."""
    model = load_base("embedder", base, max_seq_length=max_seq_length)
    path = Path(out_dir) / f"shard-{shard}.npy"
    _save_npy_atomic(path, encode_shard_file(model, texts))
    return str(path)


@task(name="store-embeddings", cache_key_fn=key_parameter("encode"), **PERSISTED)
def store_embeddings(key: str, base: str, max_seq_length: int | None, plan: ShardPlanRef, parts: list[str],
                     cache_dir: str, cache_dtype: str) -> EncodedCorpus:
    """Stream the shards, one at a time, into mining's cached corpus matrix (rows in corpus order)."""
    model = load_base("embedder", base, max_seq_length=max_seq_length)
    cache = EmbeddingCache(cache_dir, cache_dtype)
    cache_key = cache.key(model, plan["content"])
    store_shard_files(cache, cache_key, plan["rows"], list(zip(parts, plan["positions"])))
    return EncodedCorpus(cache_dir=str(Path(cache_dir).resolve()), digest=cache_key.digest, rows=plan["rows"],
                         shards=len(parts))


@flow(name="encode-corpus")
def encode_corpus(data: str | None = None, base: str = DEFAULT_BASE, max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
                  shards: int = 4, batch_size: int = 64, cache_dir: str = DEFAULT_CACHE_DIR,
                  cache_dtype: str = "float16", workdir: str = "runs/flows") -> EncodedCorpus:
    """Encode the corpus of `data` with the frozen `base` in `shards` tasks into the embedding cache.

    Args:
        data: BEIR folder; empty for the built-in demo.
        base: embedder that encodes (the one mining will use).
        max_seq_length: token limit (part of the cache key: use the training run's).
        shards: number of encode-shard tasks (capped at the number of batches).
        batch_size: texts per batch; the batches are the same whatever `shards` is.
        cache_dir: mining's embedding cache folder (`MiningConfig.cache_dir`).
        cache_dtype: storage type of the cache entry (`MiningConfig.cache_dtype`).
        workdir: folder for the shard files and persisted results.
    """
    corpus = load_data(DataConfig(path=data))
    work = Path(workdir).resolve()
    key = step_key("encode", corpus["fingerprint"], base, max_seq_length, shards, batch_size,
                   str(Path(cache_dir).resolve()), cache_dtype)
    persisted = {"result_storage": result_storage(work)}
    out_dir = str(work / "encode" / key)
    plan = plan_corpus_shards(corpus["path"], corpus["fingerprint"], shards, batch_size, out_dir)
    futures = encode_corpus_shard.with_options(**persisted).map(
        key=key, texts=plan["texts"], base=base, max_seq_length=max_seq_length, shard=range(len(plan["texts"])),
        out_dir=out_dir)
    parts = [future.result() for future in futures]
    return store_embeddings.with_options(**persisted)(key=key, base=base, max_seq_length=max_seq_length, plan=plan,
                                                      parts=parts, cache_dir=cache_dir, cache_dtype=cache_dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="BEIR folder (default: the built-in demo)")
    parser.add_argument("--base", default=DEFAULT_BASE, help="embedder that encodes (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH, help="token limit (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=4, help="encode-shard tasks (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per batch (default: %(default)s)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="mining's embedding cache folder")
    parser.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--workdir", default="runs/flows", help="shard files and persisted results")
    parser.add_argument("--task-runner", default="threads", choices=("threads", "dask"))
    parser.add_argument("--workers", type=int, help="threads, or local Dask worker processes (default: --shards)")
    parser.add_argument("--dask-address", help="scheduler of an existing Dask cluster, e.g. tcp://host:8786")
    args = parser.parse_args(argv)
    runner = make_task_runner(args.task_runner, workers=args.workers or args.shards, address=args.dask_address)
    encoded = encode_corpus.with_options(task_runner=runner)(
        data=args.data, base=args.base, max_seq_length=args.max_seq_length, shards=args.shards,
        batch_size=args.batch_size, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, workdir=args.workdir)
    print(f"{encoded['rows']} distinct texts encoded in {encoded['shards']} shards -> "
          f"{encoded['cache_dir']}/{encoded['digest']}.npy")
    return 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
