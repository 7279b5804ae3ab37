"""Downstream benchmark: does the choice of negatives change the adapter's test nDCG@10?

Trains one embedder adapter per variant with the same settings (epochs, batch, LoRA, seed) on
the train split of a BEIR dataset at ../shared/datasets/<name>, then scores it on the test split:

  in-batch  (query, positive) rows only: the other rows of the batch are the negatives
  random    N uniformly drawn non-positive documents per row (seeded)
  ours      N hard negatives from `retrieval_lora.mining.mine_hard_negatives`
  peer      N hard negatives from `sentence_transformers.util.mine_hard_negatives(use_faiss=True)`
            with the same window, margin and count

The frozen base is scored once. Every variant trains for the same number of epochs over its
own rows (row counts differ where a miner dropped rows; both are reported). On a 2-core CPU
each variant takes tens of minutes on SciFact; use --max-seq-length and --epochs to fit.

    python evals/bench_mining_downstream.py --dataset scifact
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from harness import (RESULTS, ROOT, arguments, command_line, dataset_or_skip, torch_threads,
                     write_results)
from recipes import add_window_flags, mine_peer, peer_inputs, train_ours

VARIANTS = ("in-batch", "random", "ours", "peer")


def random_rows(dataset, negatives: int, seed: int):
    """(query, positive, negative_1..N) with N uniformly drawn non-positive documents per row."""
    from datasets import Dataset

    qrels, rng, ids = dataset.split_qrels("train"), random.Random(seed), sorted(dataset.corpus)
    columns: dict[str, list[str]] = {"query": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(negatives)}}
    for query_id in sorted(qrels):
        positives = {d for d, grade in qrels[query_id].items() if grade > 0}
        for doc_id in sorted(positives):
            columns["query"].append(dataset.queries[query_id])
            columns["positive"].append(dataset.corpus[doc_id].full_text)
            drawn: list[str] = []
            while len(drawn) < negatives:
                candidate = rng.choice(ids)
                if candidate not in positives and candidate not in drawn:
                    drawn.append(candidate)
            for slot, neg in enumerate(drawn):
                columns[f"negative_{slot + 1}"].append(dataset.corpus[neg].full_text)
    return Dataset.from_dict(columns)


def rows_for(variant: str, dataset, args):
    """The training rows of `variant` (None: train_adapter builds (query, positive) rows from the train split)."""
    from retrieval_lora.mining import MiningConfig, mine_hard_negatives
    from retrieval_lora.models import load_base

    if variant == "in-batch":
        return None
    if variant == "random":
        return random_rows(dataset, args.negatives, args.seed)
    model = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    if variant == "peer":
        return mine_peer(*peer_inputs(dataset), model, rank_start=args.rank_start, rank_end=args.rank_end,
                         margin=args.margin, negatives=args.negatives, batch_size=64, verbose=False)
    config = MiningConfig(negatives=args.negatives, rank_start=args.rank_start, rank_end=args.rank_end,
                          margin=args.margin, seed=args.seed, show_progress=False, cache_dir=args.cache_dir)
    return mine_hard_negatives(model, dataset, "train", config).training_rows()


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, datasets_dir=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    add_window_flags(parser, negatives=1)  # the training default
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache" / "embeddings"),
                        help="embedding cache shared by the base's evaluation and our miner (as in the product)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_mining_downstream"))
    args = parser.parse_args(argv)
    folder = dataset_or_skip(args.dataset, args.datasets_dir)

    from retrieval_lora.data import load_beir
    from retrieval_lora.embedding_cache import EmbeddingCache
    from retrieval_lora.evaluation import retrieve, score_run
    from retrieval_lora.models import load_base, merge_adapter

    torch_threads(args.threads)
    dataset = load_beir(folder)
    qrels = dataset.split_qrels("test")
    base = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    cache = EmbeddingCache(args.cache_dir)
    report = {"command": command_line(__file__, argv), "settings": vars(args),
              "base": score_run(qrels, retrieve(base, dataset, "test", show_progress=False, cache=cache)),
              "variants": {}}
    for variant in args.variants:
        started = time.perf_counter()
        rows = rows_for(variant, dataset, args)
        result, _ = train_ours(rows, dataset, Path(args.workdir) / variant, task="embedder", epochs=args.epochs,
                               batch_size=args.batch_size, max_seq_length=args.max_seq_length, seed=args.seed,
                               mining=False, checkpoint_steps=50)  # rows carry their negatives; in-batch has none
        merge_adapter(result.model)  # same scores as the unmerged adapter, ~30% faster to encode the corpus
        metrics = score_run(qrels, retrieve(result.model.eval(), dataset, "test", show_progress=False))
        report["variants"][variant] = {"train_rows": result.train_rows, "metrics": metrics,
                                       "seconds": round(time.perf_counter() - started, 1)}
        print(variant, json.dumps(report["variants"][variant]), flush=True)
        _write(report, args)  # after every variant: a long run that stops early keeps what it measured
    return 0


def _markdown(report: dict, args) -> str:
    lines = [f"# Negatives vs adapter quality: {args.dataset} (test nDCG@10)", "", f"Command: `{report['command']}`", "",
             "| variant | train rows | nDCG@10 | recall@100 | seconds |", "|---|---|---|---|---|",
             f"| frozen base | - | {report['base']['ndcg@10']:.4f} | {report['base']['recall@100']:.4f} | - |"]
    for variant, entry in report["variants"].items():
        lines.append(f"| {variant} | {entry['train_rows']} | {entry['metrics']['ndcg@10']:.4f} | "
                     f"{entry['metrics']['recall@100']:.4f} | {entry['seconds']} |")
    lines += ["", "Same settings for every variant: all-MiniLM-L6-v2, LoRA defaults, cached MNRL, 1 epoch, batch 32, "
              f"{args.negatives} negative(s) per row from ranks {args.rank_start}..{args.rank_end - 1} with margin "
              f"{args.margin} (ours and peer), seed {args.seed}; test split. Row counts differ where a miner dropped rows "
              "with too few candidates. Seconds = getting the rows (the peer encodes the corpus itself; ours reads "
              "the base's embedding cache, filled by the base's scoring) + training + scoring"
              + (f", with {args.threads} torch thread(s)" if args.threads else "") + "."]
    return "\n".join(lines) + "\n"


def _write(report: dict, args) -> None:
    markdown = _markdown(report, args)
    write_results(RESULTS / f"mining_downstream_{args.dataset}", report, markdown)
    print(markdown, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main())
