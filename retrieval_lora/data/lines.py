"""Reading dataset files line by line, and reporting what is wrong with them by file:line.

Two kinds of finding:
- a problem (`Problems`) makes the file unusable: all of them are collected and raised at
  once in one `DataError`, so the user fixes everything in one pass;
- a repairable oddity (`warn_places`) is reported in ONE `DataWarning` per file and kind,
  counting the lines and naming the first few, so a large published dataset does not flood
  the console with one warning per line.

Files are read as UTF-8 with universal newlines, so CRLF (Windows) files parse exactly as LF
files do, and a leading byte-order mark (written by some Windows editors) is ignored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from retrieval_lora.errors import DataError

MAX_REPORTED_PROBLEMS = 20
MAX_NAMED_PLACES = 3
ENCODING = "utf-8-sig"  # plain UTF-8, plus a leading BOM dropped instead of glued to the first id


class DataWarning(UserWarning):
    """A dataset loaded, but part of it was dropped or looks wrong; the message says where and why."""


class Problems:
    """Collects file:line problems so that all of them are reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self, what: str) -> None:
        """Raise one DataError listing every problem collected (up to a cap); do nothing if none."""
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_PROBLEMS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(f"{what}: {len(self.items)} problem(s) found; fix them and load again:\n  "
                        + "\n  ".join(shown) + tail)


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending) for each non-blank line of `path`.

    Raises:
        DataError: `path` is not valid UTF-8 (the message names the file and byte offset).
    """
    # newline=None (the default) turns "\r\n" and "\r" into "\n", so no id or text keeps a "\r"
    with path.open(encoding=ENCODING) as handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    yield lineno, line.rstrip("\n")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 at byte {exc.start}; save the file as UTF-8") from exc


def read_jsonl(path: Path, problems: Problems) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs; bad lines go to `problems`.

    Raises:
        DataError: the file does not exist (bad lines are collected, not raised).
    """
    if not path.is_file():
        raise DataError(f"{path} not found; a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    rows = []
    for lineno, line in numbered_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(f"{path}:{lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(f"{path}:{lineno}", "each line must be a JSON object")
            continue
        rows.append((lineno, obj))
    return rows


def warn_places(path: Path, finding: str, places: list[str], advice: str, stacklevel: int = 4) -> None:
    """Issue one DataWarning `"{path}: {finding} (first: place, place, ...); {advice}"`.

    `places` are `file:line ...` descriptions; only the first MAX_NAMED_PLACES are named.
    Nothing is issued when `places` is empty. The default `stacklevel` attributes the warning
    to whoever called `load_beir` (warn_places <- load_qrels/load_corpus <- load_beir <- caller).
    """
    if not places:
        return
    named = ", ".join(places[:MAX_NAMED_PLACES]) + (", ..." if len(places) > MAX_NAMED_PLACES else "")
    warnings.warn(f"{path}: {finding} (first: {named}); {advice}", DataWarning, stacklevel=stacklevel)
