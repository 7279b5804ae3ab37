"""Benchmark: the encode-corpus flow's sharded corpus encoding on Prefect's task runners: threads, Dask, Ray.

The same work each time: the `encode-corpus` flow (flows/encode.py, its defaults: batch 64, 256
tokens, float16 cache) encodes the whole corpus of --dataset (SciFact: 5,183 passages) with the
packaged all-MiniLM-L6-v2 in --shards encode-shard tasks over --workers workers, one torch thread
per worker (OMP_NUM_THREADS=1; the threads runner runs its workers as threads of one process with
one torch thread each). Each runner is measured in a fresh process of its own (the harness's
run_isolated), with a fresh work folder and cache, so no task result is reused; the runner is the
one `make_task_runner` builds for `--task-runner <kind> --workers N` (a local cluster).

Figures per runner:
  cluster start / stop   the runner's __enter__ / __exit__ as the flow engine calls them (Dask: a
                         LocalCluster and its worker processes up, which prefect-dask would do at
                         the first submit; Ray: ray.init of a local cluster, workers started lazily)
  wall                   the flow run, call to result (the Prefect API server is started before)
  map phase              plan-shards' end to store-embeddings' start (the task runs' own times, read
                         from the Prefect API after the run)
  per shard              dispatch (plan-shards' end to the shard's Running state: queueing, worker
                         import of the task's modules, Prefect's task engine), body (Running to
                         Completed: base load + encoding), idle worker time per shard = (map phase x
                         workers - sum of bodies) / shards: the runner's overhead spread over shards
  peak RSS               the sum over this process and all its descendants (Prefect's API server
                         counted apart), sampled every 0.25 s; RSS counts shared pages in every
                         process that maps them, so the sum is an upper bound
  install weight         files on disk of the distributions the runner's extra adds to the project's
                         own dependencies (their requirement closure, read from installed metadata)
The embeddings of every runner are compared with the threads runner's: bit-identical or the run fails.

    python evals/bench_task_runners.py --shards 8 --workers 2
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from harness import RESULTS, arguments, command_line, dataset_or_skip, read_results, run_isolated, write_results

KINDS = ("threads", "dask", "ray")
EXTRAS = {"threads": None, "dask": "prefect-dask", "ray": "prefect-ray"}
NOTES = ("Peak RSS sums every process of the tree (the flow process, the cluster's own processes, the workers): "
         "shared pages are counted in each process, so it is an upper bound; the Prefect API server this process "
         "starts is shown apart (+). Idle worker time per shard is the map phase's worker-seconds not spent in a task "
         "body, divided by the shards: dispatch, the workers' imports of torch and the flow's modules on their first "
         "task, result hand-back and the tail where one worker waits for the other. Install times (pip, cache warm) "
         "were measured by hand, not by this script: `cp -a .venv /tmp/scratch-venv; time /tmp/scratch-venv/bin/python "
         "-m pip install prefect-ray` (the dev venv before Ray), and `prefect-dask` timed the same way after "
         "uninstalling it and the packages it adds from that copy.")


# ---- install weight -----------------------------------------------------------------------------
def _closure(name: str, extras: frozenset[str] = frozenset(), seen: set[str] | None = None) -> set[str]:
    """Normalized names of `name` and every installed distribution it requires (with its `extras`)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen = set() if seen is None else seen
    key = canonicalize_name(name)
    try:
        requires = metadata.distribution(key).requires or []
    except metadata.PackageNotFoundError:
        return seen
    seen.add(key)
    for line in requires:
        requirement = Requirement(line)
        wanted = requirement.marker is None or any(
            requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""}))
        if wanted and canonicalize_name(requirement.name) not in seen:
            _closure(requirement.name, frozenset(requirement.extras), seen)
    return seen


def _on_disk_mb(names: set[str]) -> float:
    from importlib import metadata

    total = 0
    for name in names:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            total += path.stat().st_size if path.is_file() else 0
    return total / 2**20


def install_weight(kind: str) -> dict:
    """What the runner's integration adds to the project's own dependencies: packages, MB on disk."""
    integration = EXTRAS[kind]
    if integration is None:
        return {"packages": 0, "disk_mb": 0.0, "added": []}
    added = sorted(_closure(integration) - _closure("retrieval-lora"))
    return {"packages": len(added), "disk_mb": round(_on_disk_mb(set(added)), 1), "added": added}


# ---- memory of a process tree ---------------------------------------------------------------------
class TreeRss:
    """Sample the RSS of this process and all its descendants every `every` s; keep the peaks."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self._root, self._every = psutil.Process(), every
        self.peak_total = self.peak_api = self.peak_others = 0.0
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        api = others = 0.0
        processes = [self._root, *self._root.children(recursive=True)]
        for process in processes:
            try:
                rss = process.memory_info().rss / 2**20
                is_api = "uvicorn" in " ".join(process.cmdline()) or "prefect.server" in " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            api, others = (api + rss, others) if is_api else (api, others + rss)
        self.peak_api, self.peak_others = max(self.peak_api, api), max(self.peak_others, others)
        self.peak_total = max(self.peak_total, api + others)
        self.most_processes = max(self.most_processes, len(processes))

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---- one runner, in its own process ----------------------------------------------------------------
def _timed_runner(runner, clock: dict) -> None:
    """Record the runner's __enter__ and __exit__ times (the flow engine enters a duplicate of it).

    prefect-dask creates its cluster on the first submit, not on entering: here it is created on
    entering, so that its start is timed apart from the first shard's dispatch (the same work)."""
    cls = type(runner)
    enter, leave = cls.__enter__, cls.__exit__

    def __enter__(self):
        began = time.perf_counter()
        entered = enter(self)
        if hasattr(cls, "client"):  # Dask starts its cluster at the first submit: start it here to time it
            entered.client
        clock["start_s"] = time.perf_counter() - began
        return entered

    def __exit__(self, *exc_info):
        began = time.perf_counter()
        result = leave(self, *exc_info)
        clock["stop_s"] = time.perf_counter() - began
        return result

    cls.__enter__, cls.__exit__ = __enter__, __exit__


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _phases(runs: list, workers: int) -> dict:
    """Map phase, per-shard dispatch and body, and idle worker time per shard, from the task runs' times."""
    def named(prefix: str) -> list:
        return [run for run in runs if run.name.startswith(prefix)]

    plan_end = named("plan-shards")[0].end_time
    store_start = named("store-embeddings")[0].start_time
    shards = sorted(named("encode-shard"), key=lambda run: run.start_time)
    bodies = [(run.end_time - run.start_time).total_seconds() for run in shards]
    dispatch = [(run.start_time - plan_end).total_seconds() for run in shards]
    map_phase = (store_start - plan_end).total_seconds()
    return {"map_phase_s": round(map_phase, 1), "shard_body_s": [round(b, 1) for b in bodies],
            "shard_dispatch_s": [round(d, 1) for d in dispatch],
            "first_dispatch_s": round(min(dispatch), 2),
            "idle_worker_s_per_shard": round((map_phase * workers - sum(bodies)) / len(shards), 2)}


def child(spec) -> dict:
    """One runner: start the API, run the flow under the timed runner, sample the process tree's RSS."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np
    import torch
    from prefect.client.orchestration import get_client

    torch.set_num_threads(1)
    from flows.encode import encode_corpus, make_task_runner

    with get_client(sync_client=True) as client:  # the API server up before anything is timed
        client.hello()
    work = Path(spec.work) / spec.kind
    shutil.rmtree(work, ignore_errors=True)
    memory, clock = TreeRss(), {}
    began = time.perf_counter()
    runner = make_task_runner(spec.kind, workers=spec.workers)
    _timed_runner(runner, clock)
    state = encode_corpus.with_options(task_runner=runner)(
        data=spec.data, shards=spec.shards, cache_dir=str(work / "cache"), workdir=str(work / "flow"),
        return_state=True)
    encoded = state.result()
    wall = time.perf_counter() - began
    memory.stop()
    vectors = np.load(Path(encoded["cache_dir"]) / f"{encoded['digest']}.npy", mmap_mode="r")
    np.save(work / "vectors.npy", np.asarray(vectors))
    return {"kind": spec.kind, "workers": spec.workers, "shards": encoded["shards"], "rows": encoded["rows"],
            "cluster_start_s": round(clock.get("start_s", 0.0), 2), "cluster_stop_s": round(clock.get("stop_s", 0.0), 2),
            "wall_s": round(wall, 1), **_phases(_task_runs(state.state_details.flow_run_id), spec.workers),
            "peak_rss_mb": round(memory.peak_total), "peak_rss_mb_without_api": round(memory.peak_others),
            "peak_rss_mb_api_server": round(memory.peak_api), "most_processes": memory.most_processes,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


# ---- report ------------------------------------------------------------------------------------
def _markdown(report: dict) -> str:
    lines = [f"# Sharded corpus encoding on Prefect's task runners: threads, Dask, Ray ({report['dataset']})", "",
             f"Command: `{report['command']}`", "", report["setup"], "",
             "| runner | cluster start s | cluster stop s | wall s | map phase s | first shard dispatch s | "
             "idle worker s per shard | shard body s (mean) | peak RSS MB, all processes (API server apart) | "
             "processes | extra installs: packages, MB | load average after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        weight = report["install"][run["kind"]]
        body = sum(run["shard_body_s"]) / len(run["shard_body_s"])
        lines.append(f"| {run['kind']} | {run['cluster_start_s']} | {run['cluster_stop_s']} | {run['wall_s']} | "
                     f"{run['map_phase_s']} | {run['first_dispatch_s']} | {run['idle_worker_s_per_shard']} | "
                     f"{body:.1f} | {run['peak_rss_mb_without_api']} (+{run['peak_rss_mb_api_server']}) | "
                     f"{run['most_processes']} | {weight['packages']}, {weight['disk_mb']} | "
                     f"{run['load_average_after'][0]} |")
    lines += ["", f"Embeddings: {report['identical']}.", "", "## Choice", "", report["choice"], ""]
    for kind in ("dask", "ray"):
        lines.append(f"`{EXTRAS[kind]}` adds: {', '.join(report['install'][kind]['added'])}.")
    lines += ["", report["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, datasets_dir=True, work="runs/bench_task_runners")
    parser.add_argument("--shards", type=int, default=8, help="encode-shard tasks (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="workers of each runner (default %(default)s)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="runners to measure, in this order (default: all; the first is the reference)")
    parser.add_argument("--choice", default="", help="the paragraph that names the default for a cluster and why "
                                                     "(written after reading the figures; kept from the last run)")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from the JSON (with --choice)")
    args = parser.parse_args(argv)
    if args.render:
        report = read_results(RESULTS / "task_runners")
        report["choice"], report["notes"] = args.choice or report["choice"], NOTES
        write_results(RESULTS / "task_runners", report, _markdown(report))
        return 0
    data = dataset_or_skip(args.dataset, args.datasets_dir)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for kind in args.kinds:
        runs.append(run_isolated(child, {"kind": kind, "workers": args.workers, "shards": args.shards,
                                         "data": str(data), "work": str(Path(args.work).resolve())}))
        print(runs[-1], flush=True)
    import numpy as np

    reference = np.load(Path(args.work) / args.kinds[0] / "vectors.npy")
    for kind in args.kinds[1:]:
        if not np.array_equal(np.load(Path(args.work) / kind / "vectors.npy"), reference):
            raise SystemExit(f"{kind}: the embeddings differ from {args.kinds[0]}'s")
    report = {
        "command": command_line(__file__, argv), "dataset": args.dataset, "runs": runs,
        "install": {kind: install_weight(kind) for kind in KINDS},
        "identical": f"bit-identical across {', '.join(args.kinds)} ({runs[0]['rows']} rows)",
        "load_average_before": load_before,
        "setup": (f"{args.dataset}: {runs[0]['rows']} distinct passages, all-MiniLM-L6-v2, the encode-corpus flow's "
                  f"defaults (batch 64, 256 tokens, float16 cache), {args.shards} shards over {args.workers} workers, "
                  "1 torch thread per worker, each runner in a fresh process with a fresh cache. The machine has 2 "
                  f"cores shared with other jobs (load average {load_before} before the runs, each run's after it "
                  "in the JSON): times are load-dependent, not idle figures."),
        "choice": args.choice or read_results(RESULTS / "task_runners").get("choice", "(not chosen yet)"),
        "notes": NOTES,
    }
    write_results(RESULTS / "task_runners", report, _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
