"""Does a QLoRA embedder adapter keep its quality on the full-precision base it is served on?

A QLoRA adapter is trained against the 4-bit NF4 copy of the base. `python -m retrieval_lora.evaluate`
and the server load the base in full precision (one base in memory for LoRA and QLoRA adapters
alike) and put the adapter on it, so what is served is the adapter on weights slightly different
from the ones it was trained with. This script scores the test split four ways: each base
(float32 / 4-bit) alone and with the adapter, and tests the paired difference between the
adapter on the 4-bit base (as trained) and on the float base (as served).

Reads the adapters `evals/bench_training.py` trained (`<work>/<dataset>/qlora/adapter`).

Usage:
  python evals/qlora_base_precision.py --dataset scifact
  python evals/qlora_base_precision.py --dataset nfcorpus
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import arguments, command_line, dataset_or_skip, torch_threads, write_results

METRICS = ("ndcg@10", "mrr@10", "recall@100")


def main() -> int:
    parser = arguments(__doc__, threads=0, work="runs/bench_training")
    parser.add_argument("--adapter", default=None,
                        help="QLoRA adapter folder (default: <work>/<dataset>/qlora/adapter)")
    parser.add_argument("--split", default="test", help="qrels split to score")
    parser.add_argument("--cache-dir", default="data/cache/embeddings",
                        help="embedding cache for the two bases alone (keyed by the model's exact weights)")
    parser.add_argument("--out", default="evals/results", help="folder for qlora_base_precision_<dataset>.json")
    args = parser.parse_args()
    folder = dataset_or_skip(args.dataset)

    from retrieval_lora.data import load_beir
    from retrieval_lora.embedding_cache import EmbeddingCache
    from retrieval_lora.evaluation import retrieve, score_run
    from retrieval_lora.evaluation.metrics import compare_runs
    from retrieval_lora.models import load_adapter, load_base, merged_for_inference, read_adapter_metadata

    torch_threads(args.threads)
    adapter = Path(args.adapter or Path(args.work) / args.dataset / "qlora" / "adapter")
    if not adapter.is_dir():
        print(f"{adapter}: no adapter; run `python evals/bench_training.py --dataset {args.dataset} --variants qlora` first")
        return 1
    metadata = read_adapter_metadata(adapter)
    if metadata.task != "embedder" or not metadata.qlora:
        print(f"{adapter}: a {metadata.task} adapter, qlora={metadata.qlora}; this script compares QLoRA embedders")
        return 1
    dataset = load_beir(folder)
    qrels = dataset.split_qrels(args.split)
    runs, rows = {}, []
    for precision, qlora in (("float32", False), ("4-bit NF4", True)):
        model = load_base("embedder", metadata.base_model, qlora=qlora)
        model.eval()
        started = time.perf_counter()
        runs[f"{precision} base"] = retrieve(model, dataset, args.split, k=100, batch_size=64,
                                             cache=EmbeddingCache(args.cache_dir, dtype="float32"))
        rows.append((f"{precision} base", time.perf_counter() - started))
        load_adapter(model, adapter, "embedder")
        started = time.perf_counter()
        with merged_for_inference(model):
            runs[f"{precision} base + adapter"] = retrieve(model, dataset, args.split, k=100, batch_size=64)
        rows.append((f"{precision} base + adapter", time.perf_counter() - started))
        del model  # one model in memory at a time
    scores = {name: score_run(qrels, run, METRICS) for name, run in runs.items()}
    paired = compare_runs(qrels, runs["4-bit NF4 base + adapter"], runs["float32 base + adapter"], metrics=METRICS,
                          split=args.split, baseline_name="as trained (4-bit base)",
                          candidate_name="as served (float32 base)")
    result = {
        "dataset": args.dataset, "split": args.split, "adapter": str(adapter), "queries": len(qrels),
        "command": command_line(__file__),
        "rows": [{"model": name, **scores[name], "seconds": round(seconds, 1)} for name, seconds in rows],
        "served_vs_trained": {m: {"as_trained": r.baseline, "as_served": r.candidate, "delta": r.delta,
                                  "p_value": r.p_value, "wins": r.wins, "losses": r.losses, "ties": r.ties}
                              for m, r in paired.metrics.items()},
    }
    out = Path(args.out) / f"qlora_base_precision_{args.dataset}.json"
    write_results(out, result)
    print(f"{args.dataset} {args.split} ({len(qrels)} queries), adapter {adapter}")
    print("| model | " + " | ".join(METRICS) + " | seconds |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for name, seconds in rows:
        print(f"| {name} | " + " | ".join(f"{scores[name][m]:.4f}" for m in METRICS) + f" | {seconds:.0f} |")
    print("served (float32 base) - trained (4-bit base), paired t-test:")
    for m, r in paired.metrics.items():
        print(f"  {m}: {r.delta:+.4f} (p={r.p_value:.3f}; {r.wins} better, {r.losses} worse, {r.ties} tied)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
