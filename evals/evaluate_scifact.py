"""Benchmark: our evaluation of the frozen all-MiniLM-L6-v2 on SciFact, and an adapter against it.

Checks that `retrieval_lora.evaluate` reproduces the published nDCG@10 of the frozen base on
the SciFact test split (MTEB/BEIR: 0.645; we accept 0.645 +- 0.002), with the model's own
maximum length (256 tokens) and FAISS exact search over the full corpus (5,183 documents, 300
queries, no subsampling). With `--adapter`, also writes the full adapter-vs-base report (gate
decision, significance, per-query deltas) under evals/results/scifact_adapter_vs_base/.

    python evals/evaluate_scifact.py                                   # base only
    python evals/evaluate_scifact.py --adapter /tmp/scifact_run/embedder/adapter --skip-base

Results: evals/results/scifact_base/ and scifact_adapter_vs_base/ (report.md, report.html,
metrics.json, ...) plus a summary in evals/results/scifact_evaluation.{json,md}. Runs are not
saved (they are large and reproducible).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness import RESULTS, arguments, command_line, dataset_or_skip, datasets_root, read_results, write_results

PUBLISHED_NDCG10, TOLERANCE = 0.645, 0.002


def _evaluate_adapter(dataset, evaluation, data, adapter: str, out: Path):
    """The same verbs as `python -m retrieval_lora.train` and the flow: evaluate, decide, report."""
    from retrieval_lora import pipeline
    from retrieval_lora.gate import GatePolicy

    started = time.time()
    candidate = pipeline.Candidate("embedder", Path(adapter))
    comparison = pipeline.evaluate_candidate(candidate, dataset, evaluation, data, GatePolicy().primary_metric)
    decision = pipeline.decide(comparison, GatePolicy())
    pipeline.write_report(out, comparison, decision, pipeline.report_details(dataset, candidate, evaluation, data),
                          evaluation, title=f"Embedder adapter vs frozen base on {dataset.name}/test")
    return comparison, decision, time.time() - started


def _training_settings(adapter: str) -> str:
    """The adapter's recorded training settings (its retrieval_lora.json), as one line."""
    from retrieval_lora.models import read_adapter_metadata

    config = read_adapter_metadata(adapter).config
    return ", ".join(f"{key} {config.get(key)}" for key in ("task", "base", "epochs", "loss", "batch_size", "lr",
                                                           "max_seq_length", "seed", "lora"))


def _summary_markdown(summary: dict) -> str:
    lines = ["# SciFact evaluation (test split, 300 queries, 5,183 documents)", ""]
    if "base" in summary:
        base = summary["base"]
        lines += ["## Frozen all-MiniLM-L6-v2", "", f"Command: `{base['command']}`", "", "| metric | value |", "| --- | --- |",
                  *[f"| {m} | {v:.4f} |" for m, v in base["metrics"].items()], "",
                  f"Published nDCG@10: {PUBLISHED_NDCG10} +- {TOLERANCE}; ours: {base['metrics']['ndcg@10']:.4f} "
                  f"-> **{'REPRODUCED' if base['reproduced'] else 'NOT REPRODUCED'}** ({base['seconds']:.0f} s). "
                  f"Report: [scifact_base/report.md](scifact_base/report.md)", ""]
    if "adapter" in summary:
        adapter = summary["adapter"]
        lines += ["## Adapter vs frozen base", "", f"Command: `{adapter['command']}`", "",
                  f"Adapter: `{adapter['adapter']}`, trained with {adapter.get('training', 'unknown settings')}", "",
                  "| metric | base | adapter | delta | p-value |", "| --- | --- | --- | --- | --- |",
                  *[f"| {m} | {r['baseline']:.4f} | {r['candidate']:.4f} | {r['delta']:+.4f} | {r['p_value']:.4g} |"
                    for m, r in adapter["metrics"].items()], "",
                  f"Gate: **{'PASSED' if adapter['passed'] else 'FAILED'}**", "",
                  *[f"- {reason}" for reason in adapter["reasons"]], "",
                  f"({adapter['seconds']:.0f} s.) Report: [scifact_adapter_vs_base/report.md]"
                  "(scifact_adapter_vs_base/report.md), [HTML](scifact_adapter_vs_base/report.html)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = arguments(__doc__, dataset=None)
    parser.add_argument("--dataset", default=str(datasets_root() / "scifact"),
                        help="SciFact BEIR folder (default: ../shared/datasets/scifact)")
    parser.add_argument("--adapter", help="adapter folder to compare with the frozen base")
    parser.add_argument("--skip-base", action="store_true", help="do not run the base-only evaluation again")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-run", default="/tmp/retrieval-lora-scifact/base.trec",
                        help="where the base evaluation saves its run, which the adapter evaluation then uses as "
                             "its baseline instead of encoding the corpus with the frozen base again")
    parser.add_argument("--cache-dir", default="/tmp/retrieval-lora-eval-cache",
                        help="embedding cache (float32): the base corpus is encoded once across runs")
    args = parser.parse_args()
    dataset_or_skip(Path(args.dataset).name, Path(args.dataset).parent)
    from retrieval_lora.pipeline import DataConfig, EvaluationConfig, load_data

    summary = read_results(RESULTS / "scifact_evaluation")
    command = command_line(__file__, prefix="nice -n 10 python")
    data = DataConfig(path=args.dataset, cache_dir=args.cache_dir)
    dataset = load_data(data)
    evaluation = EvaluationConfig(split="test", batch_size=args.batch_size, save_runs=False, cache=True)
    if not args.skip_base:
        from retrieval_lora import pipeline
        from retrieval_lora.models import DEFAULT_BASE

        started, out = time.time(), RESULTS / "scifact_base"
        metrics = pipeline.evaluate_base("embedder", DEFAULT_BASE, dataset, replace(evaluation, save_runs=True), data, out)
        seconds = time.time() - started
        Path(args.base_run).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(out / "runs" / "base.trec", args.base_run)  # large and reproducible: kept out of the repository
        shutil.rmtree(out / "runs")
        ndcg = metrics["ndcg@10"]
        summary["base"] = {"command": command, "metrics": metrics, "seconds": round(seconds, 1),
                           "reproduced": abs(ndcg - PUBLISHED_NDCG10) <= TOLERANCE}
        print(f"frozen base nDCG@10 = {ndcg:.4f} (published {PUBLISHED_NDCG10} +- {TOLERANCE}) in {seconds:.0f}s")
    if args.adapter:
        baseline = args.base_run if Path(args.base_run).is_file() else None
        with_baseline = replace(evaluation, baseline_run=baseline, baseline_name="frozen base embedder (run of the "
                                "base evaluation above)" if baseline else None)
        comparison, decision, seconds = _evaluate_adapter(dataset, with_baseline, data, args.adapter,
                                                          RESULTS / "scifact_adapter_vs_base")
        summary["adapter"] = {"command": command, "adapter": args.adapter, "training": _training_settings(args.adapter),
                              "baseline": comparison.baseline_name, "metrics": comparison.paired.to_dict()["metrics"],
                              "passed": decision.passed, "reasons": decision.reasons, "seconds": round(seconds, 1)}
        print(f"adapter vs base: {decision.summary()} in {seconds:.0f}s")
    write_results(RESULTS / "scifact_evaluation", summary, _summary_markdown(summary), sort_keys=True)
    print(f"wrote {RESULTS / 'scifact_evaluation.json'} and scifact_evaluation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
