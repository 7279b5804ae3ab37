"""Benchmark: embedder training throughput, 1 process vs N data-parallel processes (torchrun, gloo on the CPU).

Same rows (SciFact's labelled train pairs, seeded order), same global batch, same steps, three
ways on the same --threads cores: 1 process with --threads torch threads, 1 process with 1
thread, and N processes with --threads / N threads each. Throughput is rows per second of `trainer.train` (model loading excluded);
peak RSS is rank 0's. Each run is `python -m torch.distributed.run --nproc_per_node N
evals/harness.py <this script>:child` (the harness's child protocol), so the training code is
the library's `train_adapter` under the launcher, as `torchrun -m retrieval_lora.train` runs it.

On a 2-core machine the point is correctness (tests/test_distributed.py), not speed: two
processes on two cores do the same arithmetic as one process with two threads, plus the
gradient all-reduce and the embedding gather, and this machine is shared with other jobs.

    python evals/bench_distributed.py --processes 2 --steps 8
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, arguments, command_line, dataset_or_skip, peak_rss_mb, write_results


def child(spec) -> dict:
    """Each launched process: train the embedder for spec.steps steps; rank 0 returns the measurements."""
    import torch
    from transformers import TrainerCallback

    from retrieval_lora.data import load_beir
    from retrieval_lora.training import TrainConfig, train_adapter
    from retrieval_lora.training.distributed import finish, start, world

    torch.set_num_threads(spec.threads_per_process)
    here = start("cpu")

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds, self.steps = time.perf_counter() - self.began, state.global_step

    dataset = load_beir(Path(spec.datasets_dir) / spec.dataset)
    rows = len([1 for q in dataset.split_qrels("train").values() for grade in q.values() if grade > 0])
    config = TrainConfig(task="embedder", batch_size=spec.batch_size, max_seq_length=spec.max_seq_length,
                         epochs=spec.steps * spec.batch_size / rows, mining=False, dev_split="",
                         checkpoint_steps=10**6, device="cpu")
    clock = Clock()
    train_adapter(config, dataset, Path(spec.work) / f"p{spec.processes}-t{spec.threads_per_process}", callbacks=[clock])
    finish()
    if not here.is_main:
        os._exit(0)  # one result per run: rank 0's (the others' timings are the same steps)
    return {"processes": spec.processes, "threads_per_process": torch.get_num_threads(), "steps": clock.steps,
            "rows": clock.steps * spec.batch_size, "train_seconds": round(clock.seconds, 1),
            "rows_per_second": round(clock.steps * spec.batch_size / clock.seconds, 3),
            "rank0_peak_rss_mb": round(peak_rss_mb(), 1)}


def launch(spec: dict) -> dict:
    """`child(spec)` in spec['processes'] processes started by torchrun; rank 0's result."""
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="evals-ddp-") as folder:
        spec_file, result_file = Path(folder, "spec.json"), Path(folder, "result.json")
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads_per_process"])}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(spec["processes"]),
                   "--master_port", str(29400 + os.getpid() % 500), str(here.parent / "harness.py"),
                   f"{here}:child", str(spec_file), str(result_file)]
        done = subprocess.run(command, env=env, check=False)
        if done.returncode != 0 or not result_file.is_file():
            raise SystemExit(f"{spec['processes']} process(es): training failed (exit {done.returncode})")
        return json.loads(result_file.read_text())


def _markdown(report: dict) -> str:
    lines = [f"# Embedder training throughput: 1 process vs data-parallel processes ({report['dataset']})", "",
             f"Command: `{report['command']}`", "", report["setup"], "",
             "| processes | torch threads each | steps | rows | train s | rows / s | rank 0 peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['processes']} | {run['threads_per_process']} | {run['steps']} | {run['rows']} | "
                     f"{run['train_seconds']} | {run['rows_per_second']} | {run['rank0_peak_rss_mb']} |")
    many = report["runs"][-1]
    ratios = ", ".join(f"{many['rows_per_second'] / run['rows_per_second']:.2f}x 1 process with "
                       f"{run['threads_per_process']} thread(s)" for run in report["runs"][:-1])
    lines += ["", f"{many['processes']} processes: {ratios}. " + report["verdict"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, datasets_dir=True, threads=2, work="runs/bench_distributed")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (rows per step, all processes)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    args = parser.parse_args(argv)
    dataset_or_skip(args.dataset, args.datasets_dir)
    spec = {key: value for key, value in vars(args).items()}
    layouts = [(1, args.threads), (1, 1), (args.processes, max(1, args.threads // args.processes))]
    runs = [launch({**spec, "processes": n, "threads_per_process": t}) for n, t in layouts]
    report = {"command": command_line(__file__, argv), "dataset": args.dataset, "runs": runs,
              "setup": (f"{args.dataset} labelled train pairs (no mining), all-MiniLM-L6-v2 + LoRA (defaults), "
                        f"cached MNRL, global batch {args.batch_size}, {args.max_seq_length} tokens, {args.steps} "
                        f"steps, {args.threads} CPU cores in all; gloo backend; in-batch negatives gathered across "
                        "processes. The machine was shared with other jobs: timings are indicative only."),
              "verdict": ("On 2 cores data parallelism cannot gain compute: the same arithmetic runs on the same "
                          "cores, plus an all-reduce of the LoRA gradients and a gather of the embeddings each step. "
                          "What the rows show besides is how a process with 2 threads suffers on a loaded machine "
                          "(each parallel region waits for its slowest thread, often descheduled): compare the "
                          "processes with the 1-thread process. It pays with one device per process (8 GPUs: see "
                          "evals/results/scaling.md); the point here is correctness (tests/test_distributed.py).")}
    write_results(RESULTS / f"distributed_{args.dataset}", report, _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
