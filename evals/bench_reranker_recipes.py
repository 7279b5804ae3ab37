"""Probe reranker training recipes quickly: train on the training benchmark's mined rows, rescore a
subset of test queries, compare with the first stage on the same subset.

all-MiniLM-L6-v2 was trained as a bi-encoder: loaded as a cross-encoder it gets a new, random
scoring head, and LoRA has to teach it to read a (query, document) pair. Which loss, batch size
and number of steps get there is a question of measurement; a full benchmark row (300 queries x
100 documents) costs about an hour of this CPU, this probe (by default 100 queries x 30
documents) a few minutes of scoring, so recipes are compared here first.

Needs the rows and first stage of `evals/bench_training.py` for the dataset (run it first, or
any `--reuse` run of it). Its rows carry one mined negative (the embedders' recipe); `--negatives N`
mines the same training split again with N per row (the mining default is 4), once per N, kept
next to them as rows-neg<N> (bench_training's --reranker-negatives reads the same folder). Each
probe appends one row to evals/results/reranker_recipes_<dataset>.json and rewrites the .md table
next to it.

Usage:
  python evals/bench_reranker_recipes.py --name lambda-b8-e2 --loss lambda --batch-size 8 --epochs 2
"""

from __future__ import annotations

import json
import sys
import time

from harness import (RESULTS, arguments, command_line, dataset_or_skip, read_results, replace_row, torch_threads,
                     write_results)
from recipes import negatives_per_row, reranker_rows, train_ours, training_work


def _subset(first_stage: dict, queries: int, depth: int) -> dict:
    """The first `queries` test queries (sorted ids), each with its first-stage top `depth`."""
    from retrieval_lora.evaluation.runs import ranked

    return {q: dict(ranked(first_stage[q])[:depth]) for q in sorted(first_stage)[:queries]}


def _markdown(rows: list[dict], dataset: str) -> str:
    lines = [f"# Reranker recipe probes: {dataset}", "",
             "Each row: one reranker adapter (LoRA defaults, all-MiniLM-L6-v2 base with a new scoring head) trained "
             "on the training benchmark's mined rows, rescoring a subset of the test queries' first-stage "
             "top documents. 'first stage' is the frozen base embedder's ranking of the same subset.", "",
             "| probe | loss | negatives | rows | batch | epochs | lr | queries x depth | first stage nDCG@10 | "
             "reranked nDCG@10 | reranked MRR@10 | train time | threads | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a = row["settings"]
        lines.append(f"| {row['name']} | {a['loss']} | {a['negatives']} | {a['rows']} | {a['batch_size']} | "
                     f"{a['epochs']:g} | {a['lr']:g} | "
                     f"{a['queries']} x {a['depth']} | {row['first_stage']['ndcg@10']:.4f} | "
                     f"{row['reranked']['ndcg@10']:.4f} | {row['reranked']['mrr@10']:.4f} | "
                     f"{row['train_seconds']:.0f} s | {a['threads']} | `{row['command']}` |")
    notes = [note for row in rows for note in row.get("notes", [])]
    lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = arguments(__doc__, threads=0, work="runs/bench_training")
    parser.add_argument("--name", required=True, help="a name for this probe (its row and its scratch folder)")
    parser.add_argument("--loss", default="auto", help="reranker loss: lambda | cached-listwise | listwise | bce")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per step (0 = the library's reranker default)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training rows")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of LoRA and head")
    parser.add_argument("--negatives", type=int, default=1,
                        help="mined negatives per row (1 = the training benchmark's rows; more mines them again)")
    parser.add_argument("--max-train-pairs", type=int, default=0,
                        help="with --negatives > 1: keep the first N rows of the seeded shuffle (bench_training's cap; "
                             "0 = all)")
    parser.add_argument("--queries", type=int, default=100, help="test queries to rescore (the first ids in order)")
    parser.add_argument("--depth", type=int, default=30, help="first-stage documents rescored per query")
    args = parser.parse_args()
    folder = dataset_or_skip(args.dataset)
    work = training_work(args.work, args.dataset, "rows", "first_stage.json")

    import torch

    from retrieval_lora.data import load_beir
    from retrieval_lora.evaluation import rerank, score_run
    from retrieval_lora.models import DEFAULT_BASE, merged_for_inference

    torch_threads(args.threads)
    dataset = load_beir(folder)
    subset = _subset(json.loads((work / "first_stage.json").read_text()), args.queries, args.depth)
    qrels = {q: grades for q, grades in dataset.split_qrels("test").items() if q in subset}
    train_rows = reranker_rows(work, dataset, args.negatives, seed=42, cap=args.max_train_pairs, base=DEFAULT_BASE)
    started = time.perf_counter()
    result, config = train_ours(train_rows, dataset, work / "recipes" / args.name, task="reranker", loss=args.loss,
                                batch_size=args.batch_size, epochs=args.epochs, lr=args.lr)
    train_seconds = time.perf_counter() - started
    with merged_for_inference(result.model):
        run = rerank(result.model, dataset, subset, k=args.depth, batch_size=64)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    row = {"name": args.name, "command": command_line(__file__),
           "settings": {"loss": config.resolved_loss, "batch_size": config.resolved_batch_size, "epochs": args.epochs,
                        "lr": args.lr, "negatives": negatives_per_row(train_rows), "rows": len(train_rows),
                        "queries": len(subset), "depth": args.depth, "threads": torch.get_num_threads()},
           "first_stage": score_run(qrels, subset, ("ndcg@10", "mrr@10")),
           "reranked": score_run(qrels, run, ("ndcg@10", "mrr@10")),
           "train_seconds": round(train_seconds, 1), "training_loss_first_last": [losses[:3], losses[-3:]]}
    path = RESULTS / f"reranker_recipes_{args.dataset}"
    rows = replace_row(read_results(path).get("probes", []), row, "name")
    write_results(path, {"dataset": args.dataset, "probes": rows}, _markdown(rows, args.dataset))
    print(_markdown(rows, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
