"""Benchmark: our hard-negative mining vs sentence-transformers' `mine_hard_negatives(use_faiss=True)`.

For one BEIR dataset (train split, found at ../shared/datasets/<name>), in one invocation:

  ours-cold  `retrieval_lora.mining.mine_hard_negatives` with an empty embedding cache
  peer       `sentence_transformers.util.mine_hard_negatives(use_faiss=True)` (evals/recipes.py),
             same model, max length, batch size, window, margin, count
  ours-warm  ours again on the cache the cold run filled (no encoding): shown separately,
             since the peer gets no such reuse

Each method runs in its own subprocess so that its peak RSS (VmHWM) is its own; the model's
`encode` is wrapped to sum the time spent encoding, so wall time splits into encoding and
everything else (search, selection, building rows). Written to evals/results/mining_<name>.json
and .md, with the command line.

    python evals/bench_mining.py --dataset scifact
    python evals/bench_mining.py --dataset nfcorpus --max-queries 1000
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from harness import (RESULTS, ChildFailed, arguments, command_line, dataset_or_skip, peak_rss_mb,
                     run_isolated, status_mb, write_results)
from recipes import add_window_flags, mine_peer, peer_inputs

METHODS = ("ours-cold", "peer", "peer-reuse", "ours-warm")


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


def peer_cache_hash(model, texts: list[str]) -> str:
    """The file hash `sentence_transformers.util.mine_hard_negatives` uses for its embedding cache."""
    import hashlib

    name = model.model_card_data.base_model or ""
    return hashlib.sha256(repr((name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()


def fill_peer_cache(args, dataset, model, folder: Path) -> None:
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
    pairs, corpus = peer_inputs(dataset)
    peer_corpus = list(dict.fromkeys([*corpus, *pairs["positive"]]))
    peer_queries = list(dict.fromkeys(pairs["query"]))
    row_of_text = {text: row for row, text in enumerate(ours.texts)}
    query_row = {text: row for row, text in enumerate(query_texts)}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"corpus_embeddings_{peer_cache_hash(model, peer_corpus)}.npy",
            ours.vectors[[row_of_text[t] for t in peer_corpus]])
    np.save(folder / f"query_embeddings_{peer_cache_hash(model, peer_queries)}.npy",
            vectors[[query_row[t] for t in peer_queries]])


def run_peer(args, dataset, model, peer_cache: str | None = None) -> dict:
    table, corpus = peer_inputs(dataset)
    with contextlib.redirect_stdout(io.StringIO()) as log:  # what the peer prints: the tail goes in the table
        out = mine_peer(table, corpus, model, rank_start=args.rank_start, rank_end=args.rank_end, margin=args.margin,
                        negatives=args.negatives, batch_size=args.batch_size, output_scores=True, verbose=True,
                        cache_folder=peer_cache)
    queries_in, queries_out = set(table["query"]), set(out["query"])
    scores = [row for row in out["scores"]]
    negatives = [s for row in scores for s in row[1:]]
    return {"rows_written": len(out), "rows_possible": len(table), "queries_in": len(queries_in),
            "queries_out": len(queries_out), "queries_dropped": len(queries_in - queries_out),
            "negative_score_mean": round(sum(negatives) / max(1, len(negatives)), 5),
            "positive_score_mean": round(sum(row[0] for row in scores) / max(1, len(scores)), 5),
            "log": [line for line in log.getvalue().splitlines() if line.strip()][-20:]}


def child(spec) -> dict:
    """Run spec.method in this process (run_isolated's child); its measurements."""
    import torch

    from retrieval_lora.models import load_base

    torch.manual_seed(spec.seed)
    dataset = load_subset(spec.datasets_dir, spec.dataset, spec.max_queries, spec.seed)
    model = load_base("embedder", max_seq_length=spec.max_seq_length, device="cpu")
    peer_cache = None
    if spec.method == "peer-reuse":
        peer_cache = str(Path(spec.cache_dir) / "peer")
        fill_peer_cache(spec, dataset, model, Path(peer_cache))
    timer = EncodeTimer(model)
    rss_before = status_mb("VmRSS")
    cpu_before, started = cpu_seconds(), time.perf_counter()
    if spec.method.startswith("peer"):
        details = run_peer(spec, dataset, model, peer_cache)
    else:
        details = run_ours(spec, dataset, model, spec.cache_dir)
    wall = time.perf_counter() - started
    return {"method": spec.method, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu_seconds() - cpu_before, 2),
            "encode_seconds": round(timer.seconds, 2), "texts_encoded": timer.texts,
            "non_encode_seconds": round(wall - timer.seconds, 2),
            "non_encode_share_of_encode": round((wall - timer.seconds) / timer.seconds, 4) if timer.seconds else None,
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_over_before_mb": round(peak_rss_mb() - rss_before, 1), **details}


def run_method(args, method: str, cache_dir: str) -> dict:
    """`method`'s record: measured in its own process, or the one a run with this --cache-dir kept."""
    done_record = Path(cache_dir) / f"record-{method}.json"
    if done_record.is_file():
        print(f"== {method}: reusing {done_record}", flush=True)
        return json.loads(done_record.read_text())
    print(f"== {method}", flush=True)
    try:
        record = run_isolated(child, {**vars(args), "method": method, "cache_dir": cache_dir})
    except ChildFailed as failed:
        raise SystemExit(str(failed)) from None
    measured = json.dumps({k: v for k, v in record.items() if k != "log"})  # a reused record has no log
    done_record.write_text(measured)
    print(measured, flush=True)
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
    share = lambda seconds: f"{100 * seconds / encode:.1f}%" if encode else "n/a: the cache was already filled"  # noqa: E731
    lines += ["", f"Encoding (ours-cold, {ours['texts_encoded']} texts): {encode} s wall. Search + selection + rows "
                  f"after encoding: ours {ours['non_encode_seconds']} s ({share(ours['non_encode_seconds'])} of "
                  f"encoding; target <= 10%), peer {peer['non_encode_seconds']} s "
                  f"({share(peer['non_encode_seconds'])} of the same encoding).",
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
    parser = arguments(__doc__, datasets_dir=True)
    parser.add_argument("--max-queries", type=int, default=0, help="seeded sample of train queries (0 = all)")
    add_window_flags(parser, negatives=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peer-encodes", action="store_true",
                        help="let the peer encode the corpus itself (doubles the encoding time) instead of handing it "
                             "the embeddings our cold run stored")
    parser.add_argument("--cache-dir", help="keep the embedding cache and per-method records here; a rerun with the "
                                            "same folder reuses finished methods (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dataset_or_skip(args.dataset, args.datasets_dir)
    command = command_line(__file__, argv)
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
              "settings": {k: v for k, v in vars(args).items() if k != "cache_dir"}}
    write_results(RESULTS / f"mining_{args.dataset}", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
