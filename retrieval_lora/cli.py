"""Building argparse parsers from config dataclasses, so flags and configs never disagree.

Each field becomes `--field-name` with its type, its default and its help string; a nested
dataclass field (like `lora`) contributes its own fields as top-level flags. `--config FILE`
loads a YAML/TOML file first; flags given on the command line override it.
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


def _add_field(parser: argparse.ArgumentParser, fld: dataclasses.Field, hints: dict[str, Any],
               choices: dict[str, tuple]) -> None:
    flag = "--" + fld.name.replace("_", "-")
    kind = _plain_type(hints[fld.name])
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]
    help_text = fld.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if default is not None:  # a None default ("optional", or decided by other settings) is explained by the help text
        help_text += f" (default: {default})"
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        parser.add_argument(flag, type=kind, default=None, choices=choices.get(fld.name), metavar=None if fld.name in choices else kind.__name__.upper(),
                            help=help_text)


def build_parser(config_cls: type, description: str, *, prog: str, choices: dict[str, tuple] | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with one flag per field of `config_cls` (nested dataclasses flattened) plus `--config`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings; flags override it")
    hints = typing.get_type_hints(config_cls)
    for fld in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            group = parser.add_argument_group(f"{fld.name} settings")
            nested_hints = typing.get_type_hints(hints[fld.name])
            for nested in dataclasses.fields(hints[fld.name]):
                _add_field(group, nested, nested_hints, choices or {})
        else:
            _add_field(parser, fld, hints, choices or {})
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """Resolve the config: dataclass defaults < `--config` file < flags given on the command line."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    hints = typing.get_type_hints(config_cls)
    for fld in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            nested = dict(values.get(fld.name) or {})
            for sub in dataclasses.fields(hints[fld.name]):
                if getattr(args, sub.name, None) is not None:
                    nested[sub.name] = getattr(args, sub.name)
            values[fld.name] = nested
        elif getattr(args, fld.name, None) is not None:
            values[fld.name] = getattr(args, fld.name)
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
