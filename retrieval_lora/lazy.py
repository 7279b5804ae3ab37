"""Packages whose heavy parts load on first use, so that settings and errors import in milliseconds.

A stage package's `__init__` imports its light settings module eagerly and hands every other
name to `lazy_exports`: the first `from retrieval_lora.models import load_base` imports the heavy
module (torch, transformers, FAISS) then, not when a command only parses its flags and checks
its data. Entry points validate everything they can before that first use, so a bad path or
setting fails in about a second instead of after the libraries' import time.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` resolving each name of `exports` from its module.

    `exports` maps a public name to the module that defines it (relative to `package`, e.g.
    ".core"); the value is cached in the package's namespace after the first lookup.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
