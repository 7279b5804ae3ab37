"""A filesystem registry of adapters: numbered versions, an atomic `promoted` pointer, rollback.

Layout under the registry root (`registry_root`: `$RETRIEVAL_LORA_REGISTRY`, else `./registry`):

    <name>/
      versions/<n>/          one folder per registered version, never changed once visible
        adapter/             the adapter files (a folder `models.load_adapter` accepts)
        manifest.json        name, version, task, base, fingerprints, source, libraries, git commit
        metrics.json         evaluation metrics (optional)
        decision.json        the gate decision (optional)
        report/              the evaluation report (optional)
      promoted.json          the pointer: promoted version, promotion stack, sequence number
      history.json           every promotion and rollback, with who, when and why
      .lock                  taken (flock) by every change of this name

Guarantees:
- A version appears whole or not at all: it is built in a hidden staging folder and renamed
  into `versions/` (rename is atomic on POSIX).
- The pointer is switched by writing a temporary file and renaming it over `promoted.json`; a
  crash at any moment leaves either the old or the new pointer, never a mixture.
- Changes take an exclusive `fcntl.flock` on `.lock`, so two processes promoting at once are
  serialized; the kernel drops the lock of a process that dies, so no stale lock survives a crash.
- `history.json` is written before the pointer; entries newer than the pointer (a promotion
  interrupted between the two writes) are ignored by readers and dropped by the next change.

- Only a version whose recorded gate decision passed is promoted as a matter of course. One
  whose gate failed, or for which no gate ran (registered by hand with `register` and
  `NO_GATE`, or with no decision at all), needs `force=True` (CLI: `--force`), and its history
  entry says so: `"forced": true` and `"gate": "failed"` or `"none"`.

Not supported: registries on filesystems without POSIX rename/flock semantics (e.g. some
network mounts, Windows); deleting versions (versions are immutable lineage).

The command line (`python -m retrieval_lora.registry list|show|register|promote|rollback`)
lives in `cli.py` and `__main__.py`; it imports this module, never the other way round.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from retrieval_lora.errors import AdapterError, RegistryError
from retrieval_lora.manifest import build_manifest, staging_dir, write_json_atomic

if TYPE_CHECKING:
    from retrieval_lora.models import AdapterMetadata

DEFAULT_REGISTRY = "registry"
REGISTRY_ENV = "RETRIEVAL_LORA_REGISTRY"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
POINTER_FILE = "promoted.json"
HISTORY_FILE = "history.json"
LOCK_TIMEOUT_S = 60.0
# The decision recorded for a version registered without an evaluation (`registry register`).
NO_GATE = {"passed": None, "gate": "none",
           "reasons": ["registered by hand (registry register): no evaluation and no gate ran"]}


ANY_CHAMPION = object()  # `promote(expected=...)` default: switch whatever is promoted now


def registry_root(root: str | Path | None = None) -> Path:
    """`root` if given, else `$RETRIEVAL_LORA_REGISTRY`, else `registry` (relative to the cwd)."""
    return Path(root if root is not None else os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is unreadable ({exc}); it was edited by hand or the disk is damaged") from exc


def read_adapter_metadata(adapter_dir: str | Path) -> AdapterMetadata:
    """`models.read_adapter_metadata`, imported on first use: reading the pointer, listing and
    promoting never need torch, so the CLI and serving's `promoted()` checks stay fast."""
    from retrieval_lora.models import read_adapter_metadata as read

    return read(adapter_dir)


def check_adapter(adapter_dir: str | Path, base: str | Path | None = None) -> AdapterMetadata:
    """Check that `adapter_dir` is a complete adapter that loads onto its base, and return its metadata.

    The base is `base` if given, else the one the adapter records (`base_model`); the check
    loads it (so it needs torch and the base's weights), compares its fingerprint with the
    adapter's `base_fingerprint` and loads the adapter onto it.

    Raises:
        AdapterError: missing or corrupt files, an unknown task, another base's fingerprint,
            or a base that cannot be loaded.
    """
    from retrieval_lora.models import TASKS, load_adapter, load_base

    metadata = read_adapter_metadata(adapter_dir)
    if metadata.task not in TASKS:
        raise AdapterError(f"{adapter_dir}: task {metadata.task!r} is not one of {', '.join(TASKS)}")
    model = load_base(metadata.task, str(base if base is not None else metadata.base_model))
    load_adapter(model, adapter_dir, metadata.task)  # checks the task and the base fingerprint, then the weights
    return metadata


def gate_state(decision: dict[str, Any] | None) -> str:
    """'passed', 'failed' or 'none' (no gate ran) for a version's recorded decision."""
    if decision is None or decision.get("passed") is None:
        return "none"
    return "passed" if decision.get("passed") else "failed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of an adapter: `path` is its (immutable) version folder."""

    name: str
    version: int
    path: Path

    @property
    def spec(self) -> str:
        """`name@version`, the string `Registry.resolve` turns back into this version."""
        return f"{self.name}@{self.version}"

    @property
    def adapter_dir(self) -> Path:
        """The adapter folder, ready for `models.load_adapter`."""
        return self.path / "adapter"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def metadata(self) -> AdapterMetadata:
        """The adapter's `retrieval_lora.json` (task, base model, fingerprints, config, metrics)."""
        return read_adapter_metadata(self.adapter_dir)

    def manifest(self) -> dict[str, Any]:
        return _read_json(self.path / "manifest.json", {})

    def metrics(self) -> dict[str, Any] | None:
        return _read_json(self.path / "metrics.json", None)

    def decision(self) -> dict[str, Any] | None:
        return _read_json(self.path / "decision.json", None)


class Registry:
    """Versioned adapters on the filesystem under `root` (see the module docstring for the layout).

    Example:
        registry = Registry("registry")
        version = registry.register("scifact", Path("runs/embedder/adapter"), metrics=..., decision=...)
        registry.promote("scifact", version.version)
        registry.resolve("scifact").adapter_dir   # the promoted adapter
        registry.rollback("scifact")              # back to the version promoted before
    """

    def __init__(self, root: str | Path | None = None, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.root = registry_root(root)
        self.lock_timeout_s = lock_timeout_s

    # ---- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Adapter names with at least one registered version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and self._versions_dir(p.name).is_dir()
                      and self._version_numbers(p.name))

    def versions(self, name: str) -> list[AdapterVersion]:
        """All registered versions of `name`, oldest first. Raises RegistryError for an unknown name."""
        numbers = self._version_numbers(self._check_name(name))
        if not numbers:
            raise self._unknown_name(name)
        return [self._version(name, number) for number in numbers]

    def version(self, name: str, version: int) -> AdapterVersion:
        """Version `version` of `name`. Raises RegistryError naming the versions that exist."""
        numbers = self._version_numbers(self._check_name(name))
        if not numbers:
            raise self._unknown_name(name)
        if version not in numbers:
            raise RegistryError(f"adapter {name!r} has no version {version}; versions: "
                                f"{', '.join(map(str, numbers))}")
        return self._version(name, version)

    def promoted(self, name: str) -> AdapterVersion | None:
        """The promoted version of `name`, or None (also for an unknown name). Reads one small file."""
        pointer = _read_json(self.root / self._check_name(name) / POINTER_FILE, None)
        if not pointer:
            return None
        return self._version(name, int(pointer["version"]))

    def resolve(self, spec: str) -> AdapterVersion:
        """`"name"` -> the promoted version; `"name@3"` -> version 3; `"name@latest"` -> the newest.

        Raises:
            RegistryError: malformed spec, unknown name or version, or nothing promoted yet.
        """
        name, _, version = spec.strip().partition("@")
        self._check_name(name)
        if not version:
            promoted = self.promoted(name)
            if promoted is None:
                self.versions(name)  # unknown name -> its own clearer error
                raise RegistryError(f"adapter {name!r} has no promoted version; promote one with "
                                    f"`python -m retrieval_lora.registry promote {name} VERSION` or ask for {name}@N")
            return promoted
        if version == "latest":
            return self.versions(name)[-1]
        if not version.isdigit():
            raise RegistryError(f"adapter spec {spec!r}: the part after '@' must be a version number or 'latest'")
        return self.version(name, int(version))

    def history(self, name: str) -> list[dict[str, Any]]:
        """Promotions and rollbacks of `name`, oldest first (only those the pointer reflects)."""
        pointer = _read_json(self.root / self._check_name(name) / POINTER_FILE, None)
        seq = pointer["seq"] if pointer else 0
        return [entry for entry in _read_json(self.root / name / HISTORY_FILE, []) if entry["seq"] <= seq]

    # ---- changing ------------------------------------------------------------------------
    def register(self, name: str, adapter_dir: Path, *, metrics: dict | None = None, decision: dict | None = None,
                 report_dir: Path | None = None, config: dict | None = None) -> AdapterVersion:
        """Copy the adapter at `adapter_dir` (plus metrics, gate decision, report) into a new version.

        The version is built in a hidden staging folder and renamed into place under the lock,
        so no reader ever sees it half-written. Versions of one name must share task and base.

        Raises:
            RegistryError: bad name; the adapter's task or base differs from earlier versions.
            AdapterError: `adapter_dir` is not a complete adapter.
        """
        self._check_name(name)
        metadata = read_adapter_metadata(adapter_dir)
        staging = staging_dir(self._versions_dir(name) / "new")
        try:
            shutil.copytree(adapter_dir, staging / "adapter")
            if report_dir is not None:
                if not Path(report_dir).is_dir():
                    raise RegistryError(f"report folder {report_dir} does not exist; pass the folder the report was written to")
                shutil.copytree(report_dir, staging / "report")
            for file_name, data in (("metrics.json", metrics), ("decision.json", decision)):
                if data is not None:
                    write_json_atomic(staging / file_name, data)
            with self._lock(name):
                self._check_lineage(name, metadata)
                number = (self._version_numbers(name) or [0])[-1] + 1
                write_json_atomic(staging / "manifest.json", self._manifest(name, number, adapter_dir, metadata, config))
                os.rename(staging, self._versions_dir(name) / str(number))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._version(name, number)

    def promote(self, name: str, version: int, *, reason: str | None = None, force: bool = False,
                expected: int | None | object = ANY_CHAMPION) -> AdapterVersion:
        """Make `version` the promoted version of `name` (atomic pointer switch + history entry).

        Only a version whose recorded gate decision passed is promoted without `force=True`: one
        whose gate failed or for which no gate ran is refused unless forced, and a forced
        promotion's history entry has `"forced": true` and `"gate"` ("failed" or "none").
        Promoting the version that is already promoted changes nothing. `expected` makes the
        switch a compare-and-swap: the version the caller's decision was made against (None: no
        version promoted); another promotion in between is refused instead of overwritten.

        Raises:
            RegistryError: unknown name or version, no passed gate without force, lock not acquired,
                or the promoted version is no longer `expected`.
        """
        target = self.version(name, version)
        decision = target.decision()
        gate = gate_state(decision)
        if gate != "passed" and not force:
            why = (f"failed its promotion gate ({'; '.join(decision.get('reasons', []))})" if gate == "failed"
                   else "has no passed gate: no evaluation was recorded for it")
            raise RegistryError(f"{target.spec} {why}; pass force=True (CLI: --force) to promote it anyway")
        forced = {"forced": True, "gate": gate} if gate != "passed" else {}
        with self._lock(name):
            pointer = _read_json(self.root / name / POINTER_FILE, None)
            current = pointer["version"] if pointer else None
            if expected is not ANY_CHAMPION and current != expected:
                raise RegistryError(f"{name}: the promoted version changed from {expected} to {current} since the "
                                    f"decision on {target.spec} was made; evaluate it against {name}@{current} again")
            if pointer and pointer["version"] == version:
                return target
            stack = (pointer["stack"] if pointer else []) + [version]
            self._switch(name, pointer, stack, "promote", reason or (f"forced (gate: {gate})" if forced else None),
                         **forced)
        return target

    def rollback(self, name: str, *, reason: str | None = None) -> AdapterVersion:
        """Point `name` back at the version promoted before the current one.

        Raises:
            RegistryError: nothing promoted, or only one version was ever promoted.
        """
        self.versions(name)
        with self._lock(name):
            pointer = _read_json(self.root / name / POINTER_FILE, None)
            if not pointer:
                raise RegistryError(f"adapter {name!r} has no promoted version, so there is nothing to roll back")
            if len(pointer["stack"]) < 2:
                raise RegistryError(f"adapter {name!r}: only version {pointer['version']} was promoted; "
                                    "there is no earlier version to roll back to")
            stack = pointer["stack"][:-1]
            self._switch(name, pointer, stack, "rollback", reason)
        return self._version(name, stack[-1])

    # ---- internals -----------------------------------------------------------------------
    def _switch(self, name: str, pointer: dict | None, stack: list[int], action: str, reason: str | None,
                **marks: Any) -> None:
        """Append the history entry (with `marks`, e.g. forced=True), then rename the new pointer into place."""
        seq = (pointer["seq"] if pointer else 0) + 1
        entry = {"seq": seq, "action": action, "version": stack[-1], "previous": pointer["version"] if pointer else None,
                 "at": _now(), "user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "reason": reason,
                 **marks}
        history = [e for e in _read_json(self.root / name / HISTORY_FILE, []) if e["seq"] < seq]
        write_json_atomic(self.root / name / HISTORY_FILE, history + [entry])
        write_json_atomic(self.root / name / POINTER_FILE,
                          {"name": name, "version": stack[-1], "stack": stack, "seq": seq, "updated_at": entry["at"]})

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Exclusive flock on `<name>/.lock`, waiting up to `lock_timeout_s`."""
        lock_path = self.root / name / ".lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        with open(lock_path, "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryError(f"{lock_path} is held by another process for more than "
                                            f"{self.lock_timeout_s:.0f}s; retry when it has finished") from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _check_lineage(self, name: str, metadata: AdapterMetadata) -> None:
        numbers = self._version_numbers(name)
        if not numbers:
            return
        previous = self._version(name, numbers[-1]).metadata()
        if (previous.task, previous.base_fingerprint) != (metadata.task, metadata.base_fingerprint):
            raise RegistryError(
                f"adapter {name!r} holds {previous.task} adapters for base {previous.base_model!r} (fingerprint "
                f"{previous.base_fingerprint}); this one is a {metadata.task} adapter for {metadata.base_model!r} "
                f"(fingerprint {metadata.base_fingerprint}). Register it under another name")

    def _manifest(self, name: str, number: int, source: Path, metadata: AdapterMetadata, config: dict | None) -> dict:
        return build_manifest("adapter-version", config if config is not None else metadata.config, name=name,
                              version=number, task=metadata.task, base_model=metadata.base_model,
                              base_fingerprint=metadata.base_fingerprint,
                              dataset_fingerprint=metadata.dataset_fingerprint, qlora=metadata.qlora,
                              source=str(Path(source).resolve()))

    def _versions_dir(self, name: str) -> Path:
        return self.root / name / "versions"

    def _version_numbers(self, name: str) -> list[int]:
        folder = self._versions_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def _version(self, name: str, number: int) -> AdapterVersion:
        return AdapterVersion(name, number, self._versions_dir(name) / str(number))

    def _unknown_name(self, name: str) -> RegistryError:
        known = self.names()
        return RegistryError(f"no adapter named {name!r} in registry {self.root}; "
                             f"known: {', '.join(known) if known else 'none (register one first)'}")

    @staticmethod
    def _check_name(name: str) -> str:
        if not NAME_PATTERN.match(name or ""):
            raise RegistryError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                                "(starting with a letter or digit, at most 100 characters)")
        return name


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"
