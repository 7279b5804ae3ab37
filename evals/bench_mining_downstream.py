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

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
sys.path.insert(0, str(ROOT))

from datasets import Dataset  # noqa: E402

from retrieval_lora.data import RetrievalDataset, load_beir, pairs_from_qrels  # noqa: E402
from retrieval_lora.embedding_cache import EmbeddingCache  # noqa: E402
from retrieval_lora.evaluation import retrieve, score_run  # noqa: E402
from retrieval_lora.mining import MiningConfig, mine_hard_negatives  # noqa: E402
from retrieval_lora.models import load_base, merge_adapter  # noqa: E402
from retrieval_lora.training import TrainConfig, train_adapter  # noqa: E402

VARIANTS = ("in-batch", "random", "ours", "peer")


def random_rows(dataset: RetrievalDataset, negatives: int, seed: int) -> Dataset:
    """(query, positive, negative_1..N) with N uniformly drawn non-positive documents per row."""
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


def peer_rows(dataset: RetrievalDataset, args) -> Dataset:
    from sentence_transformers.util import mine_hard_negatives as peer_mine

    pairs = pairs_from_qrels(dataset, "train")
    model = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    corpus = [dataset.corpus[d].full_text for d in sorted(dataset.corpus)]
    return peer_mine(pairs, model, anchor_column_name="query", positive_column_name="positive", corpus=corpus,
                     range_min=args.rank_start, range_max=args.rank_end, relative_margin=round(1 - args.margin, 6),
                     num_negatives=args.negatives, sampling_strategy="top", output_format="n-tuple",
                     batch_size=64, use_faiss=True, verbose=False)


def rows_for(variant: str, dataset: RetrievalDataset, args) -> Dataset | None:
    if variant == "in-batch":
        return None  # train_adapter builds (query, positive) rows from the train split
    if variant == "random":
        return random_rows(dataset, args.negatives, args.seed)
    if variant == "peer":
        return peer_rows(dataset, args)
    model = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    config = MiningConfig(negatives=args.negatives, rank_start=args.rank_start, rank_end=args.rank_end,
                          margin=args.margin, seed=args.seed, show_progress=False, cache_dir=args.cache_dir)
    return mine_hard_negatives(model, dataset, "train", config).training_rows()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--datasets-dir", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--negatives", type=int, default=1, help="negatives per row (1 = the training default)")
    parser.add_argument("--rank-start", type=int, default=10)
    parser.add_argument("--rank-end", type=int, default=100)
    parser.add_argument("--margin", type=float, default=0.95)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache" / "embeddings"),
                        help="embedding cache shared by the base's evaluation and our miner (as in the product)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_mining_downstream"))
    args = parser.parse_args(argv)
    folder = Path(args.datasets_dir) / args.dataset
    if not (folder / "corpus.jsonl").is_file():
        print(f"skipped: {folder} not found (the benchmark needs ../shared/datasets/{args.dataset})")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dataset = load_beir(folder)
    qrels = dataset.split_qrels("test")
    base = load_base("embedder", max_seq_length=args.max_seq_length, device="cpu")
    cache = EmbeddingCache(args.cache_dir)
    report = {"command": "python evals/bench_mining_downstream.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args),
              "base": score_run(qrels, retrieve(base, dataset, "test", show_progress=False, cache=cache)),
              "variants": {}}
    for variant in args.variants:
        started = time.perf_counter()
        rows = rows_for(variant, dataset, args)
        config = TrainConfig(task="embedder", data=str(folder), output=args.workdir, epochs=args.epochs,
                             batch_size=args.batch_size, max_seq_length=args.max_seq_length, seed=args.seed,
                             dev_split="", mining=False)  # rows carry their negatives; in-batch has none
        result = train_adapter(config, dataset, Path(args.workdir) / variant, rows=rows)
        merge_adapter(result.model)  # same scores as the unmerged adapter, ~30% faster to encode the corpus
        metrics = score_run(qrels, retrieve(result.model.eval(), dataset, "test", show_progress=False))
        report["variants"][variant] = {"train_rows": result.train_rows, "metrics": metrics,
                                       "seconds": round(time.perf_counter() - started, 1)}
        print(variant, json.dumps(report["variants"][variant]), flush=True)
        _write(report, args)  # after every variant: a long run that stops early keeps what it measured
    return 0


def _write(report: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"mining_downstream_{args.dataset}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
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
    (RESULTS / f"mining_downstream_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
