"""What the evals/ benchmarks share, so that each script declares only what it measures.

Importing it is the setup: HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false, the repository root on
sys.path (retrieval_lora imports without an install). Then:
  datasets   datasets_root() (../shared/datasets or $RETRIEVAL_LORA_DATASETS), dataset_or_skip(name)
  flags      arguments(__doc__, ...): the parser, with the flags benchmarks share
  isolation  run_isolated(target, spec): target(spec) in a fresh process, spec and result as JSON
  memory     peak_rss_mb() (VmHWM), status_mb(), reset_peak(), AnonPeak (sampled RssAnon), torch_threads()
  results    command_line(), read_results(), replace_row(), write_results() (atomic JSON + markdown)
Recipes several benchmarks train or mine with (ours and the peers') are in evals/recipes.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
DATASETS_ENV = "RETRIEVAL_LORA_DATASETS"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def datasets_root() -> Path:
    """The folder of the BEIR datasets: $RETRIEVAL_LORA_DATASETS, else ../shared/datasets."""
    return Path(os.environ.get(DATASETS_ENV) or ROOT.parent / "shared" / "datasets")


def arguments(doc: str, dataset: str | None = "scifact", *, datasets_dir: bool = False, threads: int | None = None,
              work: str | None = None) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring, with the flags benchmarks share: --dataset
    (default `dataset`; None: no flag), and where asked --datasets-dir, --threads, --work (their defaults)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if dataset:
        parser.add_argument("--dataset", default=dataset, help="BEIR folder name under the datasets root")
    if datasets_dir:
        parser.add_argument("--datasets-dir", default=str(datasets_root()), help="the datasets root")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's choice)")
    if work is not None:
        parser.add_argument("--work", default=work, help="scratch folder, not committed (default %(default)s)")
    return parser


def dataset_or_skip(name: str, root: str | Path | None = None) -> Path:
    """The BEIR folder `name` under `root` (default datasets_root()). Without its corpus.jsonl the
    benchmark is skipped, not failed: one line says so and the process exits with status 0."""
    folder = Path(root if root is not None else datasets_root()) / name
    if not (folder / "corpus.jsonl").is_file():
        print(f"skipped: dataset folder {folder} not found (benchmarks read ../shared/datasets/<name>, "
              f"or ${DATASETS_ENV}/<name>)")
        raise SystemExit(0)
    return folder


# ---- isolation --------------------------------------------------------------------------------
class ChildFailed(RuntimeError):
    """run_isolated's process exited non-zero or returned nothing (its output went to this one's)."""

    def __init__(self, target: str, returncode: int) -> None:
        super().__init__(f"{target} failed in its own process (exit {returncode})")
        self.returncode = returncode


def run_isolated(target: Callable, spec) -> dict:
    """`target(spec)` run in a new Python process with this one's interpreter, environment, folder and
    output streams; its result.

    `target`: a module-level function of a file (a script's `child`); it gets the spec's fields as
    an argparse.Namespace and returns a JSON-serializable dict. `spec`: a dict or dataclass of
    JSON-serializable fields (paths become strings): every setting travels, none forwarded by hand.
    The child's peak_rss_mb() is its own. Raises ChildFailed."""
    fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    script = Path(sys.modules[target.__module__].__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="evals-child-") as folder:
        spec_file, result_file = Path(folder, "spec.json"), Path(folder, "result.json")
        spec_file.write_text(json.dumps(fields, default=str))
        command = [sys.executable, str(Path(__file__).resolve()), f"{script}:{target.__name__}", str(spec_file),
                   str(result_file)]
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0 or not result_file.is_file():
            raise ChildFailed(f"{target.__module__}.{target.__name__}", returncode)
        return json.loads(result_file.read_text())


def _child_main(target: str, spec_file: str, result_file: str) -> int:
    """run_isolated's child: load the script (not as __main__), call its function, write the result."""
    script, function = target.rsplit(":", 1)
    sys.path.insert(0, str(Path(script).parent))  # as when the script runs itself
    loader = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = sys.modules[loader.name] = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    result = getattr(module, function)(argparse.Namespace(**json.loads(Path(spec_file).read_text())))
    Path(result_file).write_text(json.dumps(result, default=str))
    return 0


# ---- memory -----------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    """One kB figure of /proc/self/status (VmHWM, VmRSS, RssAnon, ...) in MB; RuntimeError off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this measurement needs Linux)")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM, MB) since it started or since reset_peak(). Not ru_maxrss
    (only where /proc is missing): after fork + exec Linux starts that at the parent's RSS, so a
    child of a 2 GB parent would never report less than 2 GB."""
    try:
        return status_mb("VmHWM")
    except RuntimeError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start a new VmHWM window (Linux >= 4.0: writing 5 to clear_refs resets the peak RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


class AnonPeak:
    """Sample RssAnon every 20 ms in a thread and keep the maximum since the last `reset`.

    VmHWM counts file-backed pages too: weights that safetensors maps from disk count once
    touched, whether or not the process still needs them, and the kernel can drop them under
    pressure. Anonymous memory (activations, gradients, quantized copies, the heap) cannot
    be dropped, so its peak is what a machine must really have free."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._lock = threading.Lock()  # a sample of the old window must not land after a reset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            self.peak = max(self.peak, status_mb("RssAnon"))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def reset(self) -> float:
        """The peak so far (one last sample included); start a new window."""
        self._sample()
        with self._lock:
            peak, self.peak = self.peak, 0.0
        return peak

    def stop(self) -> float:
        """The last window's peak; the sampling ends."""
        self._stop.set()
        self._thread.join()
        return self.reset()


def torch_threads(threads: int) -> None:
    """Use `threads` torch threads in this process (0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---- results ----------------------------------------------------------------------------------
def command_line(script: str, argv: Iterable[str] | None = None, prefix: str = "python") -> str:
    """`prefix evals/<script> <argv>` (default sys.argv[1:]), shell-quoted: the run, from the repository root."""
    return f"{prefix} {shlex.join([f'evals/{Path(script).name}', *(sys.argv[1:] if argv is None else argv)])}"


def _named(path: Path, suffix: str) -> Path:
    stem = Path(path).with_suffix("") if Path(path).suffix in (".json", ".md") else Path(path)
    return stem.with_name(stem.name + suffix)


def read_results(path: Path) -> dict:
    """The results JSON <path>.json (`path` as write_results takes it); {} if there is none."""
    return json.loads(_named(path, ".json").read_text()) if _named(path, ".json").is_file() else {}


def replace_row(rows: list[dict], row: dict, key: str | tuple[str, ...],
                order: Callable[[dict], object] | None = None) -> list[dict]:
    """`rows` without those whose `key` field(s) equal `row`'s, plus `row`; sorted by `order` if given."""
    fields = (key,) if isinstance(key, str) else key
    kept = [r for r in rows if any(r.get(f) != row.get(f) for f in fields)] + [row]
    return sorted(kept, key=order) if order else kept


def write_results(path: Path, report: dict, markdown: str | None = None, *, sort_keys: bool = False) -> None:
    """`report` as indented JSON to <path>.json, `markdown` to <path>.md; each written to a temporary
    file and renamed into place, so a reader never sees half a table."""
    from retrieval_lora.manifest import write_text_atomic

    write_text_atomic(_named(path, ".json"), json.dumps(report, indent=2, sort_keys=sort_keys, default=str) + "\n")
    if markdown is not None:
        write_text_atomic(_named(path, ".md"), markdown)


if __name__ == "__main__":  # run_isolated's child: python evals/harness.py <script>:<function> <spec> <result>
    import harness  # this file under its own name, the module the loaded script imports

    sys.exit(harness._child_main(*sys.argv[1:]))
