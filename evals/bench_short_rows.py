"""Benchmark: drop or fill the mined rows that keep too few negatives after the margin guard?

`MiningConfig.short_rows` decides what happens to a (query, positive) row whose candidate
window (ranks 10..99, positives removed) keeps fewer than `negatives` candidates after the
margin guard: "drop" it (counted as rows.dropped.too_few_negatives) or "fill" it with the
best-ranked guarded candidates past the window (down to `fill_depth`). For one BEIR dataset
at ../shared/datasets/<name>:

  1. counts: rows and queries each choice keeps, at the embedder default (1 negative per row)
     and the reranker default (4), with the training run's own mining settings
     (`retrieval_lora.training.mining_config`); mining only, corpus embeddings from the cache;
  2. trains the default embedder adapter (`TrainConfig` defaults, seed 42) once on the "drop"
     rows and once on the "fill" rows, and scores both on the test split (merged adapter,
     whole corpus), with a paired t-test per metric (`compare_runs`, fill vs drop).

`--max-train-pairs N` caps the training rows for CPU time: a seeded sample (random.Random(seed))
of N of the split's labelled (query, positive) pairs, drawn once before mining decides which
rows are short, so both variants see the same pairs: "drop" trains on the sampled pairs that
kept enough negatives, "fill" on those it completes. `--cap rows` instead caps each variant's
own mined rows at N after the seeded shuffle (bench_training.py's --max-train-pairs): equal
steps, different pairs.

    python evals/bench_short_rows.py --dataset scifact --threads 1
    python evals/bench_short_rows.py --dataset nfcorpus --threads 1 --max-train-pairs 1000
    python evals/bench_short_rows.py --dataset scifact --counts-only

Results: evals/results/short_rows_<dataset>.md and .json (--name: another stem; per variant also
<workdir>/<dataset>/<variant>/run.json; --reuse scores a variant from it instead of training again).
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

import dataclasses  # noqa: E402

from retrieval_lora.data import load_beir  # noqa: E402
from retrieval_lora.embedding_cache import EmbeddingCache  # noqa: E402
from retrieval_lora.evaluation import compare_runs, retrieve, score_run  # noqa: E402
from retrieval_lora.mining import mine_hard_negatives  # noqa: E402
from retrieval_lora.models import load_base, merged_for_inference  # noqa: E402
from retrieval_lora.training import TrainConfig, mining_config, train_adapter  # noqa: E402

VARIANTS = ("drop", "fill")
CACHE = ROOT / "data" / "cache" / "embeddings"  # the library's default cache folder, wherever the script runs from
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def mine(base, dataset, negatives: int, short_rows: str, seed: int):
    """The training run's mining (same window, margin, seed) with `short_rows` set."""
    config = dataclasses.replace(mining_config(TrainConfig(negatives=negatives, seed=seed), len(dataset.corpus)),
                                 short_rows=short_rows, show_progress=False, cache_dir=str(CACHE))
    return mine_hard_negatives(base, dataset, "train", config)


def count(base, dataset, seed: int) -> dict:
    """Rows and queries kept per short_rows choice at 1 and 4 negatives per row."""
    counts = {}
    for negatives in (1, 4):
        for short_rows in VARIANTS:
            stats = mine(base, dataset, negatives, short_rows, seed).stats
            counts[f"{negatives}/{short_rows}"] = {"rows": stats["rows"], "queries": stats["queries"],
                                                   "fill": stats["candidates"]["fill"],
                                                   "filled_scores": stats["scores"]["filled_rows"]}
            print(f"negatives={negatives} short_rows={short_rows}: rows {stats['rows']}, queries {stats['queries']}",
                  flush=True)
    return counts


def pair_sample(dataset, size: int, seed: int) -> set[tuple[str, str]]:
    """A seeded sample of `size` labelled (query, positive) pairs of the train split (all when 0)."""
    qrels = dataset.split_qrels("train")
    pairs = sorted((q, d) for q, docs in qrels.items() for d, grade in docs.items() if grade > 0 and d in dataset.corpus)
    return set(pairs) if not size or size >= len(pairs) else set(random.Random(seed).sample(pairs, size))


def training_rows(base, dataset, variant: str, args):
    """The variant's shuffled training rows (capped per --cap) and its mining stats."""
    result = mine(base, dataset, 1, variant, args.seed)  # 1 = the embedder's default
    table = result.table()
    if args.max_train_pairs and args.cap == "pairs":
        sample = pair_sample(dataset, args.max_train_pairs, args.seed)
        table = table.filter(lambda row: (row["query_id"], row["positive_id"]) in sample)
    table = table.shuffle(seed=args.seed)  # as retrieval_lora.training._setup_rows
    if args.max_train_pairs and args.cap == "rows" and len(table) > args.max_train_pairs:
        table = table.select(range(args.max_train_pairs))
    info = {"rows": len(table), "queries": len(set(table["query_id"])), "mining": result.stats["rows"],
            "mining_queries": result.stats["queries"]}
    return table.select_columns(result.rows.column_names), info


def train_and_score(base, dataset, variant: str, args, work: Path) -> tuple[dict, dict]:
    """Train the default embedder adapter on the variant's rows; its test run and info."""
    saved = work / variant / "run.json"
    if args.reuse and saved.is_file():
        entry = json.loads(saved.read_text())
        return entry["run"], entry["info"]
    started = time.perf_counter()
    rows, info = training_rows(base, dataset, variant, args)
    config = TrainConfig(seed=args.seed, dev_split="")  # no dev split: 29-32 steps end before the first checkpoint
    result = train_adapter(config, dataset, work / variant, rows=rows)
    info["train_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    with merged_for_inference(result.model.eval()) as model:
        run = retrieve(model, dataset, "test", k=100, show_progress=False)
    info.update(score_seconds=round(time.perf_counter() - started, 1), steps=result.history[-1].get("step")
                if result.history else None, loss=dataclasses.asdict(result.loss_trend) if result.loss_trend else None)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"run": run, "info": info}))
    return run, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact", help="folder name under --datasets-dir")
    parser.add_argument("--datasets-dir", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-train-pairs", type=int, default=0, help="cap on training pairs (see --cap; 0 = all)")
    parser.add_argument("--cap", default="pairs", choices=("pairs", "rows"),
                        help="pairs: the same seeded pair sample for both variants; rows: each variant's first N rows")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--counts-only", action="store_true", help="step 1 only: mining counts, no training")
    parser.add_argument("--reuse", action="store_true", help="score variants from <workdir>/<dataset>/<variant>/run.json")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_short_rows"))
    parser.add_argument("--name", default="", help="results file stem under evals/results (default: short_rows_<dataset>)")
    args = parser.parse_args(argv)
    folder = Path(args.datasets_dir) / args.dataset
    if not (folder / "corpus.jsonl").is_file():
        print(f"skipped: {folder} not found (the benchmark needs ../shared/datasets/{args.dataset})")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dataset = load_beir(folder)
    base = load_base("embedder")  # the training run's miner: the base at its own max length (256)
    work = Path(args.workdir) / args.dataset
    report = {"command": "python evals/bench_short_rows.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "counts": count(base, dataset, args.seed), "variants": {}}
    if not args.counts_only:
        qrels = dataset.split_qrels("test")
        base_run = retrieve(base, dataset, "test", k=100, show_progress=False, cache=EmbeddingCache(CACHE))
        report["base"] = score_run(qrels, base_run, METRICS)
        runs = {}
        for variant in args.variants:
            runs[variant], info = train_and_score(base, dataset, variant, args, work)
            report["variants"][variant] = {**info, "metrics": score_run(qrels, runs[variant], METRICS)}
            print(variant, json.dumps(report["variants"][variant]["metrics"]), flush=True)
        if set(runs) == set(VARIANTS):
            paired = compare_runs(qrels, runs["drop"], runs["fill"], metrics=METRICS, stat_test="student",
                                  split="test", baseline_name="drop", candidate_name="fill").to_dict()
            report["paired"] = {key: value for key, value in paired.items() if key != "per_query"}
    _write(report, args)
    return 0


def _count_lines(counts: dict) -> list[str]:
    lines = ["| negatives per row | short_rows | rows written / possible | rows filled | rows dropped (too few) | "
             "queries mined / labelled | queries recovered | mean neg. score, filled rows |",
             "|---|---|---|---|---|---|---|---|"]
    for key, entry in counts.items():
        negatives, short_rows = key.split("/")
        rows, queries = entry["rows"], entry["queries"]
        mean = entry["filled_scores"]["negative"].get("mean", "-")
        lines.append(f"| {negatives} | {short_rows} | {rows['written']} / {rows['possible']} | {rows['filled']} | "
                     f"{rows['dropped']['too_few_negatives']} | {queries['mined']} / {queries['labelled']} | "
                     f"{queries['recovered_by_fill']} | {mean} |")
    return lines


def _write(report: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or f"short_rows_{args.dataset}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# Short mined rows, drop vs fill: {args.dataset}", ""]
    if report["variants"]:
        lines += ["| variant | train rows | train queries | nDCG@10 | MRR@10 | Recall@100 | train s | score s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| frozen base | - | - | {report['base']['ndcg@10']:.4f} | {report['base']['mrr@10']:.4f} | "
                  f"{report['base']['recall@100']:.4f} | - | - |"]
        for variant, entry in report["variants"].items():
            m = entry["metrics"]
            lines.append(f"| {variant} | {entry['rows']} | {entry['queries']} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | "
                         f"{m['recall@100']:.4f} | {entry['train_seconds']} | {entry['score_seconds']} |")
        if "paired" in report:
            lines += ["", f"Paired t-test over {report['paired']['num_queries']} test queries, fill vs drop:", "",
                      "| metric | drop | fill | delta | p-value | fill wins / losses / ties |", "|---|---|---|---|---|---|"]
            for metric, r in report["paired"]["metrics"].items():
                lines.append(f"| {metric} | {r['baseline']:.4f} | {r['candidate']:.4f} | {r['delta']:+.4f} | "
                             f"{r['p_value']:.3g} | {r['wins']} / {r['losses']} / {r['ties']} |")
        lines.append("")
    lines += [f"Command: `{report['command']}`", ""]
    cap = (f"; training capped at {args.max_train_pairs} pairs ("
           + ("the same seeded sample of labelled (query, positive) pairs for both variants, drawn before mining: drop "
              "trains on those that kept a negative, fill on those it completed" if args.cap == "pairs" else
              "each variant's first rows after the seeded shuffle") + ")") if args.max_train_pairs else "; all train rows"
    lines += ["Training: retrieval_lora.training.TrainConfig defaults (LoRA, cached MNRL, 1 epoch, batch 32, seed "
              f"{args.seed}; no dev split, so the final weights are the adapter) on rows with 1 mined negative (the "
              f"embedder default; mining_config: ranks 10..99, margin 0.95){cap}. Scored on the test split over the "
              "whole corpus with the merged adapter"
              + (f"; {args.threads} torch thread(s) on a 2-core CPU shared with other jobs, so seconds are noisy" if
                 args.threads else "") + ".", "", "## Mining counts (train split, training's mining settings)", "",
              *_count_lines(report["counts"]), "",
              "Rows filled: kept only because fill completed them from the guarded ranks past the window (100..999, "
              "positives removed). Queries recovered: queries with a row only thanks to fill."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
