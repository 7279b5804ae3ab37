"""The built-in demo dataset: natural-language -> code search over the Python standard library.

Query: the one-line summary of a function's docstring. Document: that function's source with
the docstring removed. Neither was written by us, both exist on every machine with Python, and
a general-purpose sentence embedder is clearly imperfect at matching them, so specialization
has something to show.

Splits are made by top-level package (all of `email.*` lands in one split), so no module
contributes queries to two splits. The corpus is shared by all splits, as in BEIR: every
labelled document plus distractor functions, chosen by a stable hash so the build is
deterministic for a given Python version. The dataset is built on first use into
`data/demo/` and reused afterwards; the build is atomic (temp folder, then rename).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.data.beir import RetrievalDataset, load_beir
from retrieval_lora.manifest import replace_dir_atomic, staging_dir, write_json_atomic

BUILDER_VERSION = 2
CORPUS_SIZE = 2500
SPLIT_SHARES = {"train": 0.6, "dev": 0.1, "test": 0.3}
QUERY_QUOTA = {"train": 450, "dev": 80, "test": 200}
MAX_DOC_CHARS = 800  # a snippet: signature and first lines; keeps CPU encoding fast
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "turtledemo", "__pycache__", "__phello__",
                "pydoc_data", "ensurepip", "lib2to3", "idlelib"}


@dataclass(frozen=True)
class _Function:
    doc_id: str
    package: str
    module: str
    code: str
    summary: str | None


def _stable_unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string, independent of PYTHONHASHSEED."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def _split_of(package: str) -> str:
    unit, edge = _stable_unit("split:" + package), 0.0
    for split, share in SPLIT_SHARES.items():
        edge += share
        if unit < edge:
            return split
    return "test"


def _summary(docstring: str | None) -> str | None:
    """The docstring's first paragraph on one line, if it reads like a query (4-40 words)."""
    if not docstring:
        return None
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    words = paragraph.split()
    if not 4 <= len(words) <= 40 or paragraph.lower().startswith(("deprecated", "todo", "xxx", "see ")):
        return None
    return paragraph


def _code_without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source lines (from its `def`) minus the docstring, dedented; None if trivial."""
    keep = range(node.lineno - 1, node.end_lineno)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip = range(body[0].lineno - 1, body[0].end_lineno)
        keep = [i for i in keep if i not in skip]
    code = textwrap.dedent("\n".join(lines[i] for i in keep))
    if len([line for line in code.splitlines() if line.strip()]) < 3:
        return None  # a def line and one statement is too little to search for
    return code[:MAX_DOC_CHARS]


def _functions_in(path: Path, module: str) -> list[_Function]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines()
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                code = _code_without_docstring(lines, child)
                if code is not None:
                    found.append(_Function(doc_id=f"{module}.{prefix}{child.name}", package=module.split(".")[0],
                                           module=module, code=code, summary=_summary(ast.get_docstring(child))))
    visit(tree, "")
    return found


def collect_stdlib_functions(stdlib: Path | None = None) -> list[_Function]:
    """Every module- and class-level function of the standard library, sorted by id."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    functions, seen_code = [], set()
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for function in _functions_in(path, module):
            if function.code not in seen_code:  # identical copies would be ambiguous positives
                seen_code.add(function.code)
                functions.append(function)
    return sorted({f.doc_id: f for f in functions}.values(), key=lambda f: f.doc_id)


def select_demo(functions: list[_Function]) -> tuple[list[_Function], dict[str, list[_Function]]]:
    """Pick the labelled functions per split (quota, stable hash order) and the corpus."""
    with_query = [f for f in functions if f.summary]
    seen_summaries: set[str] = set()
    labelled: dict[str, list[_Function]] = {split: [] for split in QUERY_QUOTA}
    for function in sorted(with_query, key=lambda f: _stable_unit("query:" + f.doc_id)):
        split = _split_of(function.package)
        if len(labelled[split]) < QUERY_QUOTA[split] and function.summary not in seen_summaries:
            seen_summaries.add(function.summary)
            labelled[split].append(function)
    chosen = {f.doc_id for group in labelled.values() for f in group}
    distractors = sorted((f for f in functions if f.doc_id not in chosen), key=lambda f: _stable_unit("doc:" + f.doc_id))
    corpus = [f for f in functions if f.doc_id in chosen] + distractors[: max(0, CORPUS_SIZE - len(chosen))]
    return sorted(corpus, key=lambda f: f.doc_id), labelled


def _write_demo(folder: Path, corpus: list[_Function], labelled: dict[str, list[_Function]]) -> None:
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for function in corpus:
            handle.write(json.dumps({"_id": function.doc_id, "title": function.module, "text": function.code}) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for split in labelled:
            for function in sorted(labelled[split], key=lambda f: f.doc_id):
                handle.write(json.dumps({"_id": "q:" + function.doc_id, "text": function.summary}) + "\n")
    for split, functions in labelled.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"q:{f.doc_id}\t{f.doc_id}\t1" for f in sorted(functions, key=lambda f: f.doc_id)]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def default_data_dir() -> Path:
    """Where built data goes: $RETRIEVAL_LORA_DATA_DIR, else the checkout's `data/`, else ~/.cache."""
    if env := os.environ.get("RETRIEVAL_LORA_DATA_DIR"):
        return Path(env)
    checkout_data = Path(__file__).resolve().parents[2] / "data"
    if checkout_data.is_dir() and os.access(checkout_data, os.W_OK):
        return checkout_data
    return Path.home() / ".cache" / "retrieval_lora" / "data"


def demo_dataset_path(data_dir: Path | None = None) -> Path:
    """Path of the demo BEIR folder, building it first if it is missing or from another builder."""
    target = (data_dir or default_data_dir()) / "demo"
    version = f"{BUILDER_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    stamp = target / "build.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == version:
        return target
    corpus, labelled = select_demo(collect_stdlib_functions())
    staging = staging_dir(target)
    _write_demo(staging, corpus, labelled)
    write_json_atomic(staging / "build.json", {
        "version": version, "source": "Python standard library " + sys.version.split()[0],
        "documents": len(corpus), "queries": {split: len(group) for split, group in labelled.items()},
    })
    replace_dir_atomic(staging, target)
    return target


def load_demo(data_dir: Path | None = None) -> RetrievalDataset:
    """The demo dataset, built on first use (a few seconds) and validated like any BEIR folder."""
    return load_beir(demo_dataset_path(data_dir))
