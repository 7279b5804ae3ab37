"""Benchmark: peak memory of our LoRA and QLoRA embedder training as the base model grows.

QLoRA keeps the frozen base's linear weights in 4-bit NF4, so it saves about 7/8 of those
weights' float32 bytes. On the packaged all-MiniLM-L6-v2 that is about 40 MB (its 22M
parameters are half word embeddings, which stay in float32), less than the run-to-run spread
of a training process's peak RSS, so the training benchmark cannot show the saving. This one
trains the same recipe on bases of growing size to show where 4-bit weights start to pay:

  minilm-l6    all-MiniLM-L6-v2, the packaged weights (22M parameters)
  bert-base    the BERT-base shape (12 layers x 768, 110M), random weights
  bert-large   the BERT-large shape (24 layers x 1024, 335M), random weights

Model hubs are unreachable here, so the larger shapes are built from a BertConfig with
MiniLM's tokenizer and random weights: memory does not depend on the weights' values, and
quality is not measured here (see bench_training.py for that).

Each (size, variant) trains in its own process with retrieval_lora.training on the first
--steps x --batch-size (query, positive) pairs of the dataset's train split (in-batch
negatives, no mining: a random base's ranking would mine nothing meaningful), with the
library's defaults otherwise (cached MNRL, mini-batch 4, LoRA r=16 on all linear layers);
variants lora, qlora and the same two with --gradient-checkpointing (lora-gc, qlora-gc).
Recorded per process: the base's weights in memory, RSS before training, the high-water mark
(VmHWM) while loading and preparing and during training alone (VmHWM is reset between the two
through /proc/self/clear_refs), and the peak of anonymous memory (RssAnon sampled every 20 ms)
in the same two windows. Later runs with the same settings add to or replace earlier rows.

Usage:
  python evals/bench_memory_scaling.py                      # all sizes and variants
  python evals/bench_memory_scaling.py --sizes minilm-l6,bert-base --steps 2
  python evals/bench_memory_scaling.py --report-only        # redraw table and plot from saved rows
Results: evals/results/memory_scaling.json, .md and .png (with the command that made them).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from harness import (RESULTS, AnonPeak, ChildFailed, arguments, command_line, dataset_or_skip, peak_rss_mb,
                     read_results, replace_row, reset_peak, run_isolated, status_mb, torch_threads, write_results)
from recipes import train_ours

SIZES = {  # name: BertConfig shape (None = the packaged model itself)
    "minilm-l6": None,
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}
VARIANTS = ("lora", "qlora", "lora-gc", "qlora-gc")  # -gc: with --gradient-checkpointing
def build_base(size: str, work: Path, seed: int) -> str:
    """The model folder for `size`: the packaged base, or a sentence-transformers folder of random weights."""
    from retrieval_lora.models import DEFAULT_BASE, resolve_base

    if SIZES[size] is None:
        return DEFAULT_BASE
    folder = work / "models" / size
    if (folder / "modules.json").is_file():
        return str(folder)
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(DEFAULT_BASE))
    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **SIZES[size]))
    staging = work / "models" / f"{size}.partial"
    encoder.save_pretrained(staging / "hf")
    tokenizer.save_pretrained(staging / "hf")
    transformer = Transformer(str(staging / "hf"))
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")])
    model.save(str(staging / "st"))
    (staging / "st").rename(folder)  # the folder appears whole or not at all
    shutil.rmtree(staging)
    return str(folder)


def child(spec) -> dict:
    """Train one (spec.size, spec.variant) in this process (run_isolated's child); its memory figures."""
    from transformers import TrainerCallback

    from retrieval_lora.data import load_beir
    from retrieval_lora.data.pairs import pairs_from_qrels

    torch_threads(spec.threads)
    marks: dict = {"rss_after_imports_mb": round(status_mb("VmRSS"))}
    anon = AnonPeak()

    class Marks(TrainerCallback):
        def on_train_begin(self, train_args, state, control, model=None, **kwargs):
            weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            marks.update(base_weights_mb=round(weights / 2**20), rss_before_training_mb=round(status_mb("VmRSS")),
                         peak_loading_mb=round(peak_rss_mb()), anon_peak_loading_mb=round(anon.reset()))
            reset_peak()
            marks["started"] = time.perf_counter()

        def on_train_end(self, train_args, state, control, **kwargs):
            marks["seconds"] = time.perf_counter() - marks.pop("started")

    dataset = load_beir(spec.data)
    rows = pairs_from_qrels(dataset, "train").shuffle(seed=spec.seed)
    rows = rows.select(range(min(len(rows), spec.steps * spec.batch_size)))
    result, _ = train_ours(rows, dataset, Path(spec.work) / "runs" / f"{spec.size}-{spec.variant}",
                           callbacks=[Marks()], task="embedder", base=spec.base, qlora=spec.variant.startswith("qlora"),
                           gradient_checkpointing=spec.variant.endswith("-gc"), batch_size=spec.batch_size,
                           max_seq_length=spec.max_seq_length, mining=False, seed=spec.seed)
    steps = -(-len(rows) // spec.batch_size)
    seconds = marks.pop("seconds")
    return {"size": spec.size, "variant": spec.variant, **marks, "peak_training_mb": round(peak_rss_mb()),
            "anon_peak_training_mb": round(anon.stop()),
            "total_parameters": result.total, "trainable_parameters": result.trainable,
            "steps": steps, "seconds_per_step": round(seconds / steps, 1)}


def _order(row: dict) -> tuple[int, int]:
    return list(SIZES).index(row["size"]), VARIANTS.index(row["variant"])


def _peaks(row: dict) -> tuple[float, float]:
    """(process peak RSS, process peak anonymous memory) in MB: the larger of the loading and training windows."""
    return (max(row["peak_loading_mb"], row["peak_training_mb"]),
            max(row["anon_peak_loading_mb"], row["anon_peak_training_mb"]))


def _markdown(report: dict) -> str:
    commands = list(dict.fromkeys(row["command"] for row in report["rows"]))
    lines = ["# Memory scaling: LoRA vs QLoRA embedder training", "", "Commands (rows of later runs replace or add to "
             "those of earlier runs with the same settings):", "", *[f"    {command}" for command in commands], "",
             f"Machine: {report['machine']}. {report['dataset']} train pairs, batch {report['batch_size']} (in-batch "
             f"negatives), {report['steps']} step(s) per process, max_seq_length {report['max_seq_length']}, "
             f"{report['threads']} torch threads; otherwise the library's defaults (cached MNRL, LoRA r=16 on all "
             "linear layers). bert-base and bert-large are those shapes with random weights (memory does not depend "
             "on the values; no quality is measured here).", "",
             "| base | parameters | variant | base weights in memory | peak RSS: loading | peak RSS: training | "
             "peak RSS | QLoRA saves (RSS) | peak anonymous memory | QLoRA saves (anonymous) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peaks = {(row["size"], row["variant"]): _peaks(row) for row in report["rows"] if "error" not in row}
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['size']} | | {row['variant']} | failed: {row['error']} | | | | | | |")
            continue
        rss, anon = peaks[(row["size"], row["variant"])]
        # QLoRA rows are compared with plain LoRA (the library's default), with or without checkpointing
        lora = peaks.get((row["size"], "lora")) if row["variant"].startswith("qlora") else None
        saved_rss = f"{(lora[0] - rss) / 1024:+.2f} GB" if lora else "-"
        saved_anon = f"{(lora[1] - anon) / 1024:+.2f} GB" if lora else "-"
        lines.append(f"| {row['size']} | {row['total_parameters'] / 1e6:.0f}M | {row['variant']} | "
                     f"{row['base_weights_mb']:,} MB | {row['peak_loading_mb'] / 1024:.2f} GB | "
                     f"{row['peak_training_mb'] / 1024:.2f} GB | {rss / 1024:.2f} GB | {saved_rss} | "
                     f"{anon / 1024:.2f} GB | {saved_anon} |")
    lines += ["", "Peak RSS = the process's high-water mark (VmHWM) over loading and training = what "
              "bench_training.py reports; the loading and training windows are split by resetting VmHWM when "
              "training begins. It counts file-backed pages: base weights that safetensors maps from disk count once "
              "they are read, whether or not they are still needed. Peak anonymous memory = the highest RssAnon "
              "sampled every 20 ms (activations, gradients, the 4-bit copies, the heap: memory the kernel cannot "
              "drop). \"QLoRA saves\" = LoRA's peak minus QLoRA's (positive: QLoRA uses less). Speed is not a "
              "result of this benchmark (a step per process; bench_training.py times whole runs); the JSON keeps "
              "seconds per step for reference.", "",
              "![peak memory by base size](memory_scaling.png)", ""]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["rows"] if "error" not in row]
    sizes = list(dict.fromkeys(row["size"] for row in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, which, title in ((axes[0], 0, "peak RSS (VmHWM)"), (axes[1], 1, "peak anonymous memory (RssAnon)")):
        for number, variant in enumerate(variants):
            offset = (number - (len(variants) - 1) / 2) * width
            values = [next((_peaks(r)[which] / 1024 for r in rows if r["size"] == size and r["variant"] == variant), None)
                      for size in sizes]
            bars = ax.bar([i + offset for i in range(len(sizes))], [v or 0 for v in values], width, label=variant)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "-" for v in values], fontsize=7)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_title(title)
        ax.legend()
    axes[0].set_ylabel("GB, training process")
    fig.suptitle("LoRA vs QLoRA embedder training memory by base size (- = not run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(report: dict) -> None:
    write_results(RESULTS / "memory_scaling", report, _markdown(report))
    _plot(report, RESULTS / "memory_scaling.png")


def main() -> int:
    parser = arguments(__doc__, threads=2, work="runs/bench_memory")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {tuple(SIZES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--steps", type=int, default=1,
                        help="training steps per process (the peak comes in the first: LoRA's optimizer state is tiny)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--max-seq-length", type=int, default=128, help="truncate texts to this many tokens")
    parser.add_argument("--seed", type=int, default=42, help="seed for the random weights, row sample and training")
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from the saved results")
    args = parser.parse_args()
    if args.report_only:
        _write(read_results(RESULTS / "memory_scaling"))
        print((RESULTS / "memory_scaling.md").read_text())
        return 0
    args.data = str(dataset_or_skip(args.dataset))
    unknown = sorted(set(args.sizes.split(",")) - set(SIZES))
    if unknown:
        parser.error(f"--sizes: unknown size {unknown[0]!r}; choose from {tuple(SIZES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "dataset": args.dataset, "steps": args.steps,
              "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "threads": args.threads, "rows": []}
    earlier = read_results(RESULTS / "memory_scaling")
    if earlier and all(earlier.get(key) == value for key, value in report.items() if key != "rows"):
        report["rows"], report["notes"] = earlier["rows"], earlier.get("notes", [])  # same settings: earlier rows stay
    for size in args.sizes.split(","):
        base = build_base(size, work, args.seed)
        for variant in args.variants.split(","):
            print(f"== {size} {variant}", flush=True)
            try:
                row = run_isolated(child, {**vars(args), "size": size, "variant": variant, "base": base})
            except ChildFailed as failed:
                row = {"size": size, "variant": variant, "error": f"exit {failed.returncode}"}
            row["command"] = command_line(__file__)
            report["rows"] = replace_row(report["rows"], row, ("size", "variant"), _order)
            _write(report)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
