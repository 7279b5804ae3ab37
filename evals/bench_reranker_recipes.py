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

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals"))  # bench_training: the rows it mines


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="a name for this probe (its row and its scratch folder)")
    parser.add_argument("--dataset", default="scifact", help="folder name under ../shared/datasets")
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--work", default="runs/bench_training", help="bench_training's scratch folder")
    args = parser.parse_args()

    import torch
    from bench_training import negatives_per_row, reranker_rows
    from retrieval_lora.data import load_beir
    from retrieval_lora.evaluation import rerank, score_run
    from retrieval_lora.models import DEFAULT_BASE, merged_for_inference
    from retrieval_lora.training import TrainConfig, train_adapter

    work = Path(args.work) / args.dataset
    if not (work / "rows").is_dir() or not (work / "first_stage.json").is_file():
        print(f"{work}: no mined rows / first stage; run `python evals/bench_training.py --dataset {args.dataset}` first")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_beir(ROOT.parent / "shared" / "datasets" / args.dataset)
    subset = _subset(json.loads((work / "first_stage.json").read_text()), args.queries, args.depth)
    qrels = {q: grades for q, grades in dataset.split_qrels("test").items() if q in subset}
    out = work / "recipes" / args.name
    config = TrainConfig(task="reranker", loss=args.loss, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                         dev_split="", output=str(out), checkpoint_steps=10_000)
    train_rows = reranker_rows(work, dataset, args.negatives, seed=42, cap=args.max_train_pairs, base=DEFAULT_BASE)
    started = time.perf_counter()
    result = train_adapter(config, dataset, out, rows=train_rows)
    train_seconds = time.perf_counter() - started
    with merged_for_inference(result.model):
        run = rerank(result.model, dataset, subset, k=args.depth, batch_size=64)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    row = {"name": args.name, "command": "python " + " ".join(sys.argv),
           "settings": {"loss": config.resolved_loss, "batch_size": config.resolved_batch_size, "epochs": args.epochs,
                        "lr": args.lr, "negatives": negatives_per_row(train_rows), "rows": len(train_rows), "queries": len(subset),
                        "depth": args.depth, "threads": torch.get_num_threads()},
           "first_stage": score_run(qrels, subset, ("ndcg@10", "mrr@10")),
           "reranked": score_run(qrels, run, ("ndcg@10", "mrr@10")),
           "train_seconds": round(train_seconds, 1), "training_loss_first_last": [losses[:3], losses[-3:]]}
    results = ROOT / "evals" / "results" / f"reranker_recipes_{args.dataset}.json"
    rows = json.loads(results.read_text())["probes"] if results.is_file() else []
    rows = [r for r in rows if r["name"] != args.name] + [row]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"dataset": args.dataset, "probes": rows}, indent=2) + "\n")
    results.with_suffix(".md").write_text(_markdown(rows, args.dataset))
    print(_markdown(rows, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
