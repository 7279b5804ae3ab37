"""Building argparse parsers from config dataclasses, so flags and configs never disagree.

Each field becomes `--field-name` (or the field's own `flag`) with its type, its default and its
help string. A nested dataclass field is a section: its fields become flags too, each with the
section's `prefix` (`lora` -> `--lora-rank`, `gate` -> `--gate-alpha`), in a help group of their
own. `--config FILE` loads a YAML/TOML file of the same nested shape first; flags given on the
command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from retrieval_lora.config import config_from_dict, read_config_file
from retrieval_lora.errors import RetrievalLoraError


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int; other annotations unchanged."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _sections(config_cls: type, path: tuple[str, ...] = (), prefix: str = ""):
    """(dotted path, flag, field, type) for every leaf field of `config_cls`, sections flattened."""
    hints = typing.get_type_hints(config_cls)
    for fld in dataclasses.fields(config_cls):
        kind = _plain_type(hints[fld.name])
        if dataclasses.is_dataclass(kind):
            yield from _sections(kind, (*path, fld.name), prefix + fld.metadata.get("prefix", f"{fld.name}-"))
        else:
            flag = "--" + fld.metadata.get("flag", prefix + fld.name.replace("_", "-"))
            yield ".".join((*path, fld.name)), flag, fld, kind


def _add_field(parser: Any, dest: str, flag: str, fld: dataclasses.Field, kind: Any, choices: dict[str, tuple]) -> None:
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]
    help_text = fld.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if default is not None:  # a None default ("optional", or decided by other settings) is explained by the help text
        help_text += f" (default: {default})"
    allowed = choices.get(dest.rsplit(".", 1)[-1])
    if typing.get_origin(kind) is typing.Literal:  # a typed choice: its values are the flag's choices
        allowed, kind = typing.get_args(kind), str
    if kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=allowed,
                            metavar=None if allowed else kind.__name__.upper(), help=help_text)


def build_parser(config_cls: type, description: str, *, prog: str, choices: dict[str, tuple] | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with one flag per leaf field of `config_cls` (sections prefixed) plus `--config`.

    `choices` maps a field name to its allowed values (shown by `--help`, checked by argparse).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (the same sections as "
                                                         "the flags); flags override it")
    groups: dict[str, Any] = {}
    for dest, flag, fld, kind in _sections(config_cls):
        section = dest.rsplit(".", 1)[0] if "." in dest else ""
        if section and section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        _add_field(groups.get(section, parser), dest, flag, fld, kind, choices or {})
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """Resolve the config: dataclass defaults < `--config` file < flags given on the command line."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for dest, _, _, _ in _sections(config_cls):
        value = getattr(args, dest, None)
        if value is None:
            continue
        *sections, name = dest.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else node
        node[name] = value
    return config_from_dict(config_cls, values, source=args.config or "command line")


def run_cli(main: typing.Callable[[list[str] | None], int], argv: list[str] | None = None) -> typing.NoReturn:
    """Run an entry point, printing our errors as one readable line instead of a traceback."""
    try:
        code = main(argv)
    except RetrievalLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind (artifacts are renamed into place when complete)",
              file=sys.stderr)
        code = 130
    sys.exit(code)
