"""How much can reranking the first stage's top k gain at most? For each dataset: the frozen base
embedder's nDCG@10 on the test split, and that of an oracle reranker that orders the same top k by
the test labels themselves (grade first, the first stage's order among equal grades).

The oracle is the ceiling of any reranker of that first stage at that depth: where it sits far above
the first stage and a trained reranker gains nothing, the room was there and the training labels did
not teach the model to use it. Reads the corpus embeddings from the embedding cache when the frozen
base encoded them already (mining and the benchmarks do); no training.
Results: evals/results/rerank_headroom.md and .json.

Usage:
  python evals/rerank_headroom.py --dataset nfcorpus,scifact --depths 10,20
"""

from __future__ import annotations

import sys

import harness
from harness import arguments, dataset_or_skip, torch_threads


def markdown(report: dict) -> str:
    depths = report["depths"]
    lines = ["# How much can reranking the top k gain? (oracle ceiling)", "", f"`{report['command']}`", "",
             f"The frozen base embedder's ranking on the {report['split']} split, and an oracle that reorders the same "
             "top k by the labels themselves (grade first, the first stage's order among equal grades): the most any "
             "reranker of that first stage at that depth can reach. nDCG@10.", "",
             "| dataset | queries | first stage | " + " | ".join(
                 f"oracle over top {k} | queries with a positive in top {k}" for k in depths) + " |",
             "|---|---|---|" + "---|---|" * len(depths)]
    for row in report["rows"]:
        cells = [f"{row['first_stage']:.4f}"]
        for k in depths:
            found = row["with_positive"][str(k)]
            cells += [f"{row['oracle'][str(k)]:.4f}", f"{found} ({100 * found / row['queries']:.0f}%)"]
        lines.append(f"| {row['dataset']} | {row['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = arguments(__doc__, dataset="nfcorpus,scifact", threads=2)
    parser.add_argument("--depths", default="10,20", help="comma-separated rerank depths k")
    parser.add_argument("--split", default="test", help="labelled split to score")
    args = parser.parse_args()
    folders = {name: dataset_or_skip(name) for name in args.dataset.split(",")}
    torch_threads(args.threads)

    from retrieval_lora.data import load_beir
    from retrieval_lora.embedding_cache import EmbeddingCache
    from retrieval_lora.evaluation.metrics import score_run
    from retrieval_lora.evaluation.runs import ranked, retrieve
    from retrieval_lora.models import load_base
    from retrieval_lora.pipeline.config import DEFAULT_CACHE_DIR

    depths = [int(depth) for depth in args.depths.split(",")]
    model = load_base("embedder")
    rows = []
    for name, folder in folders.items():
        dataset = load_beir(folder)
        qrels = dataset.split_qrels(args.split)
        run = retrieve(model, dataset, args.split, k=100, cache=EmbeddingCache(DEFAULT_CACHE_DIR), show_progress=False)
        run = {query: ranking for query, ranking in run.items() if query in qrels}
        row = {"dataset": name, "queries": len(run), "first_stage": score_run(qrels, run, ("ndcg@10",))["ndcg@10"],
               "oracle": {}, "with_positive": {}}
        for k in depths:
            oracle, found = {}, 0
            for query, ranking in run.items():
                order = [doc for doc, _ in ranked(ranking)]
                grades = qrels[query]
                top = sorted(order[:k], key=lambda doc: -grades.get(doc, 0))  # stable: equal grades keep their order
                found += any(grades.get(doc, 0) > 0 for doc in top)
                oracle[query] = {doc: float(len(order) - rank) for rank, doc in enumerate(top + order[k:])}
            row["oracle"][str(k)] = score_run(qrels, oracle, ("ndcg@10",))["ndcg@10"]
            row["with_positive"][str(k)] = found
        rows.append(row)
    report = {"command": harness.command_line(__file__), "split": args.split, "depths": depths, "rows": rows}
    harness.write_results(harness.RESULTS / "rerank_headroom", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
