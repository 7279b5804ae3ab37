"""The `encode-corpus` flow: a corpus encoded in shards, mapped over tasks, into the embedding cache.

    python -m flows.encode --data ../shared/datasets/scifact --shards 8
    python -m flows.encode --data ../shared/datasets/scifact --shards 8 --task-runner dask
    python -m flows.encode --data ... --shards 64 --task-runner dask --dask-address tcp://scheduler:8786
    python -m flows.encode --data ../shared/datasets/scifact --shards 8 --task-runner ray
    python -m flows.encode --data ... --shards 64 --task-runner ray --ray-address ray://head:10001 --shard-gpus 1

The scale-out seam of `specialize`: the frozen base's corpus embeddings are what mining needs
first and what costs most. `plan-shards` fixes the batches of `retrieval_lora.sharding` and writes
each shard's texts to a file of its own; each `encode-shard` task loads the base itself (tasks get
paths, never models), reads only its shard's file and writes its vectors to `shard-<n>.npy`; no
worker holds the corpus. `store-embeddings` streams the shards, one at a time, into mining's
embedding cache under the key mining looks up (the entry is written memory-mapped, so it may be
larger than memory), where `mine_hard_negatives` finds it instead of encoding the corpus again:
bit-for-bit what one process would compute.

Task runners: threads in this process by default (`ThreadPoolTaskRunner`), Dask
(`prefect_dask.DaskTaskRunner`, extra `dask`) or Ray (`prefect_ray.RayTaskRunner`, extra `ray`).
Each starts a local cluster of `--workers` worker processes, which report to this process's
Prefect API, or joins an existing cluster (`--dask-address`, `--ray-address`). An existing Dask
cluster's workers need `PREFECT_API_URL` set to a Prefect server (`prefect server start`) in
their own environment; Ray carries this process's `PREFECT_API_URL` setting to every worker of
the job (its runtime environment). Workers must be able to import `flows` and `retrieval_lora`
and read the dataset and work folders. GPUs: `--shard-gpus N` makes Ray reserve N GPUs for each
encode-shard task (Ray's `num_gpus`, passed through `prefect_ray.context.remote_options`); Ray
then sets the task's `CUDA_VISIBLE_DEVICES`, so each shard encodes on a GPU of its own. Dask has
no per-task GPU option here: start one Dask worker per GPU instead. Which runner for a cluster,
measured: evals/results/task_runners.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Literal, TypedDict, get_args

import flows  # noqa: F401  (telemetry off before Prefect loads)
import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.caching import key_parameter, result_storage, step_key
from flows.tasks import PERSISTED, load_data, load_checked, not_a_setting_error
from retrieval_lora.embedding_cache import EmbeddingCache, corpus_content
from retrieval_lora.errors import ConfigError
from retrieval_lora.models import DEFAULT_BASE, DEFAULT_MAX_SEQ_LENGTH, load_base
from retrieval_lora.pipeline import DEFAULT_CACHE_DIR, DataConfig
from retrieval_lora.sharding import corpus_texts, encode_shard_file, plan_shards, store_shard_files, write_shard_texts

RunnerKind = Literal["threads", "dask", "ray"]
RUNNER_KINDS: tuple[str, ...] = get_args(RunnerKind)


def make_task_runner(kind: RunnerKind = "threads", workers: int | None = None, address: str | None = None,
                     gpus: int | None = None) -> TaskRunner:
    """Threads in this process, or a Dask or Ray cluster: a local one of `workers` processes, or the one at `address`.

    `gpus` (Ray, local cluster only): the GPUs the local Ray cluster offers its tasks (default: Ray
    counts the visible ones).

    Raises:
        ConfigError: an unknown kind, Dask or Ray asked for without its integration installed,
            or `gpus` given for anything but a local Ray cluster.
    """
    if kind not in RUNNER_KINDS:
        raise ConfigError(f"task_runner={kind!r}: must be one of {', '.join(map(repr, RUNNER_KINDS))}")
    if gpus is not None and (kind != "ray" or address):
        raise ConfigError(f"gpus={gpus}: only a local Ray cluster is told how many GPUs to offer "
                          "(an existing cluster offers its own; Dask and threads do not reserve GPUs)")
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        return _dask_runner(workers, address)
    return _ray_runner(workers, address, gpus)


def _this_api_url() -> str:
    """The Prefect API this process reports to (its temporary local server when none is configured).

    Local worker processes are given it: without it each would start a temporary API server of
    its own, and its task runs would not show beside the flow run."""
    return str(get_client(sync_client=True).api_url)


def _dask_runner(workers: int | None, address: str | None) -> TaskRunner:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("task_runner='dask' needs prefect-dask: pip install 'retrieval-lora[dask]'") from exc
    if address:
        return DaskTaskRunner(address=address)
    # One task thread per worker: torch already uses the worker's cores for one batch.
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1,
                                          "env": {"PREFECT_API_URL": _this_api_url()}})


def _ray_runner(workers: int | None, address: str | None, gpus: int | None) -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ConfigError("task_runner='ray' needs prefect-ray (and Ray): pip install 'retrieval-lora[ray]'") from exc
    if address:
        # The job's runtime environment reaches every worker of the cluster, so a configured
        # Prefect server is all the workers need; a temporary local one they could not reach.
        from prefect.settings import PREFECT_API_URL

        configured = PREFECT_API_URL.value()
        return RayTaskRunner(address=address, init_kwargs={"runtime_env": {"env_vars": {
            "PREFECT_API_URL": configured}}} if configured else {})
    # Each encode-shard task takes one CPU (Ray's default), so `workers` tasks run at once, each in
    # a worker process of its own with one torch thread (Ray sets OMP_NUM_THREADS to the task's
    # CPUs). No dashboard: the task runs show in Prefect's UI, and it is processes and memory more.
    init = {"num_cpus": workers or 2, "include_dashboard": False,
            "runtime_env": {"env_vars": {"PREFECT_API_URL": _this_api_url()}}}
    if gpus is not None:
        init["num_gpus"] = gpus
    return RayTaskRunner(init_kwargs=init)


def cluster_address(kind: RunnerKind, dask_address: str | None = None, ray_address: str | None = None) -> str | None:
    """The address of the existing cluster for runner `kind`, refusing one given for the other kind.

    Raises:
        ConfigError: `dask_address` without kind 'dask', or `ray_address` without kind 'ray'.
    """
    for name, value, owner in (("dask_address", dask_address, "dask"), ("ray_address", ray_address, "ray")):
        if value and kind != owner:
            raise ConfigError(f"{name}={value!r} is for task_runner='{owner}', not {kind!r}: "
                              f"set task_runner to '{owner}' or drop {name}")
    return dask_address if kind == "dask" else ray_address if kind == "ray" else None


def shard_resources(gpus: float) -> contextlib.AbstractContextManager:
    """The context the encode-shard tasks are submitted in: Ray reserves `gpus` GPUs for each (0: none).

    Raises:
        ConfigError: `gpus` > 0 when the flow's task runner is not Ray's.
    """
    if not gpus:
        return contextlib.nullcontext()
    runner = getattr(FlowRunContext.get(), "task_runner", None)
    try:
        from prefect_ray import RayTaskRunner
        from prefect_ray.context import remote_options
    except ImportError:
        RayTaskRunner = None
    if RayTaskRunner is None or not isinstance(runner, RayTaskRunner):
        raise ConfigError(f"shard_gpus={gpus:g}: only the 'ray' task runner reserves GPUs per task (this run's is "
                          f"{type(runner).__name__}); use --task-runner ray, or with Dask start one worker per GPU")
    return remote_options(num_gpus=gpus)


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
                  cache_dtype: str = "float16", workdir: str = "runs/flows", shard_gpus: float = 0.0) -> EncodedCorpus:
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
        shard_gpus: GPUs Ray reserves for each encode-shard task (Ray's `num_gpus`; 0: none); the
            'ray' task runner only (ConfigError otherwise).
    """
    resources = shard_resources(shard_gpus)  # refused before any work when the runner cannot reserve GPUs
    corpus = load_data(DataConfig(path=data))
    work = Path(workdir).resolve()
    key = step_key("encode", corpus["fingerprint"], base, max_seq_length, shards, batch_size,
                   str(Path(cache_dir).resolve()), cache_dtype)
    persisted = {"result_storage": result_storage(work)}
    out_dir = str(work / "encode" / key)
    plan = plan_corpus_shards(corpus["path"], corpus["fingerprint"], shards, batch_size, out_dir)
    with resources:
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
    parser.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"),
                        help="storage type of the cache entry (default: %(default)s)")
    parser.add_argument("--workdir", default="runs/flows", help="shard files and persisted results")
    parser.add_argument("--task-runner", default="threads", choices=RUNNER_KINDS,
                        help="where the encode-shard tasks run: threads of this process, or the worker processes "
                             "of a Dask or Ray cluster (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="threads, or local Dask/Ray worker processes (default: --shards)")
    parser.add_argument("--dask-address", help="scheduler of an existing Dask cluster, e.g. tcp://host:8786")
    parser.add_argument("--ray-address", help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    parser.add_argument("--gpus", type=int, help="GPUs a local Ray cluster offers its tasks (default: Ray counts them)")
    parser.add_argument("--shard-gpus", type=float, default=0.0,
                        help="GPUs Ray reserves for each encode-shard task (--task-runner ray; default: none)")
    args = parser.parse_args(argv)
    address = cluster_address(args.task_runner, args.dask_address, args.ray_address)
    runner = make_task_runner(args.task_runner, workers=args.workers or args.shards, address=address, gpus=args.gpus)
    encoded = encode_corpus.with_options(task_runner=runner)(
        data=args.data, base=args.base, max_seq_length=args.max_seq_length, shards=args.shards,
        batch_size=args.batch_size, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, workdir=args.workdir,
        shard_gpus=args.shard_gpus)
    print(f"{encoded['rows']} distinct texts encoded in {encoded['shards']} shards -> "
          f"{encoded['cache_dir']}/{encoded['digest']}.npy")
    return 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
