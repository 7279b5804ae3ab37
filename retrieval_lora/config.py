"""Loading stage configs from YAML/TOML files and saving them beside artifacts.

Each stage defines one dataclass config (peft style: typed fields with defaults and a `help`
string in the field metadata, validation in `__post_init__`). This module only moves those
dataclasses to and from files; it holds no defaults of its own.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

from retrieval_lora.errors import ConfigError

T = TypeVar("T")


def field(default: Any, help: str, *, flag: str | None = None, prefix: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a default and a one-line help string (shown by `--help`).

    `flag` names the field's command-line flag when it is not `--<field-name>`; for a nested
    config (a section), `prefix` is put before each of its flags (`lora` -> `--lora-rank`), so
    two sections' settings of the same name never share a flag.
    """
    metadata = {"help": help, **({"flag": flag} if flag else {}), **({"prefix": prefix} if prefix is not None else {})}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        factory = (lambda: dataclasses.replace(value)) if dataclasses.is_dataclass(value) else (lambda: type(value)(value))
        return dataclasses.field(default_factory=factory, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (`.yaml`/`.yml`) or TOML (`.toml`) file into a plain dict.

    Raises:
        ConfigError: the file is missing, unparsable, or not a mapping at the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .yaml or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown extension {path.suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    return data


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from `values` (sections as nested dicts), dropping unknown keys with a
    warning (a file written by a newer version).

    Raises:
        ConfigError: a value has the wrong type or fails the dataclass's own validation.
    """
    import typing

    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown settings {unknown} (written by a newer version?)", stacklevel=2)
    kwargs = {}
    for name in known & set(values):
        value, kind = values[name], hints[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            value = config_from_dict(kind, value, source=f"{source}: {name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict with sorted keys, ready for JSON/YAML."""
    return dict(sorted(dataclasses.asdict(config).items()))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (sorted keys) atomically to `path`."""
    from retrieval_lora.manifest import write_text_atomic

    values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in config_to_dict(config).items()}
    text = yaml.safe_dump(json.loads(json.dumps(values, default=str)), sort_keys=True)
    write_text_atomic(Path(path), text)
