"""Where served adapters come from: the registry (normal case) or plain adapter folders.

A source turns a model spec from a request into an immutable `AdapterRef`:
- `"name"`: the version promoted right now (a promotion is picked up by the next request);
- `"name@3"`: version 3, pinned; `"name@latest"`: the newest registered version.
Error messages never list other adapters' names: tenants share one registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from retrieval_lora.errors import RegistryError
from retrieval_lora.registry import NAME_PATTERN, Registry
from retrieval_lora.serving.errors import InvalidRequest, ModelNotFound, ServingError
from retrieval_lora.serving.pool import AdapterRef


def split_spec(spec: str) -> tuple[str, str]:
    """(name, version part) of `name[@version]`.

    Raises:
        InvalidRequest: the name has characters adapter names cannot have.
    """
    name, _, version = spec.strip().partition("@")
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(f"model {spec!r} is not a valid model name: use NAME or NAME@VERSION (letters, digits, "
                             "'.', '_' or '-')", code="invalid_model")
    return name, version


class AdapterSource(Protocol):
    def resolve(self, spec: str) -> AdapterRef: ...
    def names(self) -> list[str]: ...
    def current(self, name: str) -> AdapterRef | None: ...


class RegistrySource:
    """Adapters from a `Registry`; a bare name follows the promoted pointer at every request."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def resolve(self, spec: str) -> AdapterRef:
        """The adapter version `spec` names. Raises ModelNotFound or InvalidRequest."""
        name, version = split_spec(spec)
        try:
            if not version:
                return self._promoted(name)
            if version == "latest":
                return _ref(self._versions(name)[-1])
            if not version.isdigit():
                raise InvalidRequest(f"model {spec!r}: after '@' give a version number or 'latest'", code="invalid_model")
            numbers = [v.version for v in self._versions(name)]
            if int(version) not in numbers:
                raise ModelNotFound(f"model {name!r} has no version {version}; versions: {', '.join(map(str, numbers))}")
            return _ref(self.registry.version(name, int(version)))
        except RegistryError as exc:  # a damaged pointer or manifest: the operator must look
            raise ServingError(f"registry error for model {name!r}: {exc}", code="registry_error") from exc

    def names(self) -> list[str]:
        return self.registry.names()

    def current(self, name: str) -> AdapterRef | None:
        version = self.registry.promoted(name)
        return _ref(version) if version is not None else None

    def _promoted(self, name: str) -> AdapterRef:
        version = self.registry.promoted(name)
        if version is None:
            self._versions(name)
            raise ModelNotFound(f"model {name!r} has no promoted version yet; ask for {name}@VERSION or promote one")
        return _ref(version)

    def _versions(self, name: str) -> list:
        try:
            return self.registry.versions(name)
        except RegistryError:  # its message lists every adapter name; ours must not
            raise ModelNotFound(f"model {name!r} not found") from None


class FolderSource:
    """Fixed adapter folders by name (version 1 each), for in-process use without a registry."""

    def __init__(self, folders: dict[str, str | Path]) -> None:
        self.folders = {name: Path(path) for name, path in folders.items()}

    def resolve(self, spec: str) -> AdapterRef:
        name, version = split_spec(spec)
        if name not in self.folders or version not in ("", "1", "latest"):
            raise ModelNotFound(f"model {spec!r} not found")
        return AdapterRef(name, 1, self.folders[name])

    def names(self) -> list[str]:
        return sorted(self.folders)

    def current(self, name: str) -> AdapterRef | None:
        return AdapterRef(name, 1, self.folders[name]) if name in self.folders else None


def _ref(version) -> AdapterRef:
    return AdapterRef(version.name, version.version, version.adapter_dir)
