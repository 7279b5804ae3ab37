"""Benchmark: our hard-negative mining vs sentence-transformers' `mine_hard_negatives(use_faiss=True)`.

For one BEIR dataset (train split, found at ../shared/datasets/<name>), in one invocation:

  ours-cold  `retrieval_lora.mining.mine_hard_negatives` with an empty embedding cache
  peer       `sentence_transformers.util.mine_hard_negatives(use_faiss=True)`, same model,
             max length, batch size, window (range_min/range_max), margin (relative_margin =
             1 - margin), count, `top` sampling, n-tuple output
  ours-warm  ours again on the cache the cold run filled (no encoding): shown separately,
             since the peer gets no such reuse

Each method runs in its own subprocess so that its peak RSS (ru_maxrss) is its own; the model's
`encode` is wrapped to sum the time spent encoding, so wall time splits into encoding and
everything else (search, selection, building rows). Written to evals/results/mining_<name>.json
and .md, with the command line.

    python evals/bench_mining.py --dataset scifact
    python evals/bench_mining.py --dataset nfcorpus --max-queries 1000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "evals" / "results"
sys.path.insert(0, str(ROOT))


METHODS = ("ours-cold", "peer", "peer-reuse", "ours-warm")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_subset(datasets_dir: str, name: str, max_queries: int, seed: int):
    """The dataset with its train qrels cut to a seeded sample of `max_queries` queries (0 = all)."""
    from retrieval_lora.data import RetrievalDataset, load_beir

    dataset = load_beir(Path(datasets_dir) / name)
    train = dataset.split_qrels("train")
    chosen = sorted(train)
    if max_queries and len(chosen) > max_queries:
        chosen = sorted(random.Random(seed).sample(chosen, max_queries))
    qrels = {**dataset.qrels, "train": {q: train[q] for q in chosen}}
    return RetrievalDataset(dataset.root, dataset.corpus, dataset.queries, qrels)


class EncodeTimer:
    """Sums the wall time spent inside the model's own `encode` (wrapped on the instance)."""

    def __init__(self, model) -> None:
        self.seconds, self.texts, original = 0.0, 0, model.encode

        def timed(*args, **kwargs):
            started = time.perf_counter()
            texts = args[0] if args else kwargs["inputs"]  # encode_document/encode_query pass `inputs=`
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.texts += len(texts)
        model.encode = timed


def run_ours(args, dataset, model, cache_dir: str) -> dict:
    from retrieval_lora.mining import MiningConfig, mine_hard_negatives

    config = MiningConfig(negatives=args.negatives, rank_start=args.rank_start, rank_end=args.rank_end,
                          margin=args.margin, sampling="top", index="exact", seed=args.seed,
                          batch_size=args.batch_size, cache_dir=cache_dir, show_progress=False)
    result = mine_hard_negatives(model, dataset, "train", config)
    stats = result.stats
    return {"rows_written": stats["rows"]["written"], "rows_possible": stats["rows"]["possible"],
            "queries_in": stats["queries"]["labelled"], "queries_out": stats["queries"]["mined"],
            "rows_dropped": stats["rows"]["dropped"], "queries_skipped": stats["queries"]["skipped"],
            "candidates": stats["candidates"], "negative_score_mean": stats["scores"]["negative"].get("mean"),
            "positive_score_mean": stats["scores"]["positive"].get("mean"), "internal_seconds": stats["seconds"],
            "cache": {k: stats["cache"][k] for k in ("corpus", "queries")}}


def peer_inputs(dataset) -> tuple[list[tuple[str, str]], list[str]]:
    """(query, positive) text pairs of the train split and the corpus texts, as the peer takes them."""
    train = dataset.split_qrels("train")
    pairs = [(dataset.queries[q], dataset.corpus[d].full_text) for q in sorted(train)
             for d, grade in sorted(train[q].items()) if grade > 0 and d in dataset.corpus]
    return pairs, [dataset.corpus[d].full_text for d in sorted(dataset.corpus)]


def peer_cache_hash(model, texts: list[str]) -> str:
    """The file hash `sentence_transformers.util.mine_hard_negatives` uses for its embedding cache."""
    import hashlib

    name = model.model_card_data.base_model or ""
    return hashlib.sha256(repr((name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()


def fill_peer_cache(args, dataset, model, corpus: list[str], pairs: list[tuple[str, str]], folder: Path) -> None:
    """Hand the peer the embeddings our cold run stored (same model, texts, max length, batch size),
    under the names its `cache_folder` looks for, so it skips encoding like our warm run does."""
    import numpy as np

    from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached, encode_texts_cached, texts_fingerprint

    cache = EmbeddingCache(args.cache_dir)
    ours = encode_corpus_cached(model, dataset, cache, show_progress=False)
    train = dataset.split_qrels("train")
    query_texts = [dataset.queries[q] for q in sorted(train)
                   if any(g > 0 and d in dataset.corpus for d, g in train[q].items())]
    vectors, status = encode_texts_cached(model, query_texts, cache, content=f"queries:{texts_fingerprint(query_texts)}",
                                          show_progress=False)
    if ours.cache != "hit" or status != "hit":
        raise SystemExit("peer --reuse: our cold run's cache is missing; run ours-cold first with the same --cache-dir")
    peer_corpus = list(dict.fromkeys(corpus + [p[1] for p in pairs]))
    peer_queries = list(dict.fromkeys(p[0] for p in pairs))
    row_of_text = {text: row for row, text in enumerate(ours.texts)}
    query_row = {text: row for row, text in enumerate(query_texts)}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"corpus_embeddings_{peer_cache_hash(model, peer_corpus)}.npy",
            ours.vectors[[row_of_text[t] for t in peer_corpus]])
    np.save(folder / f"query_embeddings_{peer_cache_hash(model, peer_queries)}.npy",
            vectors[[query_row[t] for t in peer_queries]])


def run_peer(args, dataset, model, peer_cache: str | None = None) -> dict:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as peer_mine

    pairs, corpus = peer_inputs(dataset)
    table = Dataset.from_dict({"query": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
    out = peer_mine(table, model, anchor_column_name="query", positive_column_name="positive", corpus=corpus,
                    range_min=args.rank_start, range_max=args.rank_end, relative_margin=round(1 - args.margin, 6),
                    num_negatives=args.negatives, sampling_strategy="top", output_format="n-tuple",
                    output_scores=True, batch_size=args.batch_size, use_faiss=True, verbose=True,
                    cache_folder=peer_cache)
    queries_in, queries_out = set(table["query"]), set(out["query"])
    scores = [row for row in out["scores"]]
    negatives = [s for row in scores for s in row[1:]]
    return {"rows_written": len(out), "rows_possible": len(table), "queries_in": len(queries_in),
            "queries_out": len(queries_out), "queries_dropped": len(queries_in - queries_out),
            "negative_score_mean": round(sum(negatives) / max(1, len(negatives)), 5),
            "positive_score_mean": round(sum(row[0] for row in scores) / max(1, len(scores)), 5)}


def worker(args) -> None:
    """Run one method in this process and print one JSON line with its measurements."""
    import torch

    from retrieval_lora.models import load_base

    torch.manual_seed(args.seed)
    dataset = load_subset(args.datasets_dir, args.dataset, args.max_queries, args.seed)
    model = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    peer_cache = None
    if args.worker == "peer-reuse":
        peer_cache = str(Path(args.cache_dir) / "peer")
        pairs, corpus = peer_inputs(dataset)
        fill_peer_cache(args, dataset, model, corpus, pairs, Path(peer_cache))
    timer = EncodeTimer(model)
    rss_before = rss_mb()
    cpu_before, started = cpu_seconds(), time.perf_counter()
    if args.worker.startswith("peer"):
        details = run_peer(args, dataset, model, peer_cache)
    else:
        details = run_ours(args, dataset, model, args.cache_dir)
    wall = time.perf_counter() - started
    record = {"method": args.worker, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu_seconds() - cpu_before, 2),
              "encode_seconds": round(timer.seconds, 2), "texts_encoded": timer.texts,
              "non_encode_seconds": round(wall - timer.seconds, 2),
              "non_encode_share_of_encode": round((wall - timer.seconds) / timer.seconds, 4) if timer.seconds else None,
              "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
              "peak_rss_over_before_mb": round(peak_rss_mb() - rss_before, 1), **details}
    print("RESULT " + json.dumps(record), flush=True)
    (Path(args.cache_dir) / f"record-{args.worker}.json").write_text(json.dumps(record))


def run_method(args, method: str, cache_dir: str) -> dict:
    done_record = Path(cache_dir) / f"record-{method}.json"
    if done_record.is_file():
        print(f"== {method}: reusing {done_record}", flush=True)
        return json.loads(done_record.read_text())
    command = [sys.executable, __file__, "--worker", method, "--cache-dir", cache_dir, *args.forwarded]
    print(f"== {method}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    sys.stderr.write(done.stderr[-3000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{method} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peer_log = [line for line in done.stdout.splitlines() if not line.startswith("RESULT ")]
    record = json.loads(lines[-1][len("RESULT "):])
    if method.startswith("peer"):
        record["log"] = [line for line in peer_log if line.strip()][-20:]
    print(json.dumps({k: v for k, v in record.items() if k != "log"}), flush=True)
    return record


def markdown(report: dict) -> str:
    runs = report["runs"]
    head = ("| method | wall s | encode s | non-encode s | non-encode / encode | CPU s | peak RSS MiB | "
            "RSS over start MiB | rows written / possible | queries out / in |")
    lines = [f"# Hard-negative mining: {report['dataset']} (train)", "", f"Command: `{report['command']}`", "",
             report["setup"], "", head, "|" + "---|" * 10]
    for run in runs:
        lines.append(f"| {run['method']} | {run['wall_seconds']} | {run['encode_seconds']} | {run['non_encode_seconds']} | "
                     f"{run['non_encode_share_of_encode']} | {run['cpu_seconds']} | {run['peak_rss_mb']} | "
                     f"{run['peak_rss_over_before_mb']} | {run['rows_written']} / {run['rows_possible']} | "
                     f"{run['queries_out']} / {run['queries_in']} |")
    ours = next(r for r in runs if r["method"] == "ours-cold")
    peer = next(r for r in runs if r["method"].startswith("peer"))
    encode = ours["encode_seconds"]
    lines += ["", f"Encoding (ours-cold, {ours['texts_encoded']} texts): {encode} s wall. Search + selection + rows "
                  f"after encoding: ours {ours['non_encode_seconds']} s ({100 * ours['non_encode_seconds'] / encode:.1f}% of "
                  f"encoding; target <= 10%), peer {peer['non_encode_seconds']} s "
                  f"({100 * peer['non_encode_seconds'] / encode:.1f}% of the same encoding).",
              "", f"Queries dropped: ours {ours['queries_in'] - ours['queries_out']} "
                  f"(reasons: {ours['queries_skipped']}), peer {peer['queries_dropped']}. "
                  f"Rows dropped: ours {ours['rows_dropped']}, peer {peer['rows_possible'] - peer['rows_written']}.",
              f"Mean negative score: ours {ours['negative_score_mean']}, peer {peer['negative_score_mean']}; "
              f"mean positive score (rows kept): ours {ours['positive_score_mean']}, peer {peer['positive_score_mean']}.",
              f"Our candidates (per row): {ours['candidates']}.",
              f"Our internal timings (s): {ours['internal_seconds']}.", "", "Peer log (tail):", "", "```",
              *peer.get("log", []), "```", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact", help="folder name under ../shared/datasets")
    parser.add_argument("--datasets-dir", default=str(DATASETS), help="folder holding the BEIR datasets")
    parser.add_argument("--max-queries", type=int, default=0, help="seeded sample of train queries (0 = all)")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--rank-start", type=int, default=10)
    parser.add_argument("--rank-end", type=int, default=100)
    parser.add_argument("--margin", type=float, default=0.95)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peer-encodes", action="store_true",
                        help="let the peer encode the corpus itself (doubles the encoding time) instead of handing it "
                             "the embeddings our cold run stored")
    parser.add_argument("--cache-dir", help="keep the embedding cache and per-method records here; a rerun with the "
                                            "same folder reuses finished methods (default: a temporary folder)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forwarded = [item for name in ("datasets_dir", "dataset", "max_queries", "negatives", "rank_start", "rank_end", "margin",
                                        "max_seq_length", "batch_size", "seed")
                      for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    if not (Path(args.datasets_dir) / args.dataset / "corpus.jsonl").is_file():
        print(f"skipped: {Path(args.datasets_dir) / args.dataset} not found (the benchmark needs ../shared/datasets/{args.dataset})")
        return 0
    command = "python evals/bench_mining.py " + " ".join(sys.argv[1:] if argv is None else argv)
    peer = "peer" if args.peer_encodes else "peer-reuse"
    with tempfile.TemporaryDirectory(prefix="bench-mining-cache-") as temporary:
        cache_dir = args.cache_dir or temporary
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        runs = [run_method(args, method, cache_dir) for method in ("ours-cold", peer, "ours-warm")]
    sample = f"a seeded sample of {args.max_queries} train queries (seed {args.seed})" if args.max_queries else "all train queries"
    setup = (f"all-MiniLM-L6-v2 (packaged), max_seq_length {args.max_seq_length}, batch {args.batch_size}, CPU "
             f"(2 cores shared with other jobs: wall times are noisy, CPU seconds less so); {sample}; "
             f"{args.negatives} negatives from ranks {args.rank_start}..{args.rank_end - 1}, margin {args.margin} "
             f"(peer: range_min={args.rank_start}, range_max={args.rank_end}, relative_margin={round(1 - args.margin, 6)}), "
             "top sampling, exact FAISS search. Each method runs in its own process (its own peak RSS). "
             + ("The peer encodes the corpus and queries itself." if args.peer_encodes else
                "Encoding is measured once, in ours-cold: both methods encode with the same "
                "SentenceTransformer.encode call (same texts, batch size, max length), so the peer (peer-reuse) is "
                "handed the embeddings ours-cold stored, through its own cache_folder, and is timed on everything "
                "after encoding; its end-to-end time is that plus the same encoding time.")
             + " ours-warm reuses the cache ours-cold filled (no encoding).")
    report = {"dataset": args.dataset, "command": command, "setup": setup, "runs": runs,
              "settings": {k: v for k, v in vars(args).items() if k not in ("forwarded", "worker", "cache_dir")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"mining_{args.dataset}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"mining_{args.dataset}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
