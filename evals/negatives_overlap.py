"""How contested are the mined negatives? For the training benchmark's mined rows of a dataset:
the share of negatives that are a labelled positive of some other training query, and for how
many training queries a row's positive and its negatives are labelled positive (medians).

A negative that other queries count as relevant is a contradiction a reranker has to resolve
from the query text alone; where nearly every negative is one (NFCorpus), the rows teach little.
Reads the rows `evals/bench_training.py` mined (`--rows rows-neg4` etc.); no model is run.

Usage:
  python evals/negatives_overlap.py --dataset nfcorpus --rows rows-neg4-cap1000
  python evals/negatives_overlap.py --dataset scifact --rows rows-neg4
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from harness import arguments, dataset_or_skip
from recipes import training_work


def main() -> int:
    parser = arguments(__doc__, work="runs/bench_training")
    parser.add_argument("--rows", default="rows", help="rows folder under runs/bench_training/<dataset>")
    parser.add_argument("--split", default="train", help="qrels split the rows were mined from")
    args = parser.parse_args()
    folder = dataset_or_skip(args.dataset)

    from datasets import load_from_disk

    from retrieval_lora.data import load_beir

    rows_dir = training_work(args.work, args.dataset, args.rows) / args.rows
    dataset = load_beir(folder)
    doc_id = {doc.full_text: key for key, doc in dataset.corpus.items()}
    positive_of: dict[str, set[str]] = defaultdict(set)  # document -> training queries labelling it relevant
    for query, grades in dataset.split_qrels(args.split).items():
        for doc, grade in grades.items():
            if grade > 0:
                positive_of[doc].add(query)
    rows = load_from_disk(str(rows_dir))
    negative_columns = [c for c in rows.column_names if c.startswith("negative")]
    positive_counts, negative_counts = [], []
    for row in rows:
        positive_counts.append(len(positive_of[doc_id[row["positive"]]]))
        negative_counts += [len(positive_of[doc_id[row[column]]]) for column in negative_columns]
    contested = sum(count > 0 for count in negative_counts)
    print(f"{args.dataset} {args.rows}: {len(rows)} rows, {len(negative_counts)} negatives")
    print(f"  negatives labelled positive for another {args.split} query: {contested} "
          f"({100 * contested / len(negative_counts):.1f}%)")
    print(f"  {args.split} queries labelling a row's positive relevant, median: {statistics.median(positive_counts):g}; "
          f"a negative: {statistics.median(negative_counts):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
