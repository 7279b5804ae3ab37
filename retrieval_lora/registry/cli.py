"""`python -m retrieval_lora.registry list|show|register|promote|rollback`: look at and steer the registry.

`register NAME ADAPTER_DIR` adds an adapter trained elsewhere as a new version, after checking
that it is complete and loads onto its base (task and base fingerprint); its decision records
that no gate ran, so promoting it needs `promote --force`, which the history marks as forced.

The registry folder is `--registry DIR`, else `$RETRIEVAL_LORA_REGISTRY`, else `./registry`.
"""
# This docstring is the `--help` description. `__main__.py` runs `main`; the registry package
# (`retrieval_lora/registry/__init__.py`) never imports this module, so there is no import cycle.

from __future__ import annotations

import argparse
import json

from pathlib import Path

from retrieval_lora.config import read_config_file
from retrieval_lora.errors import RegistryError
from retrieval_lora.registry import (
    DEFAULT_REGISTRY, NO_GATE, REGISTRY_ENV, AdapterVersion, Registry, check_adapter, gate_state,
)

EPILOG = f"""examples:
  python -m retrieval_lora.registry list
  python -m retrieval_lora.registry show scifact            # the promoted version
  python -m retrieval_lora.registry show scifact@2
  python -m retrieval_lora.registry register support-faq runs/embedder/adapter --metrics metrics.json
  python -m retrieval_lora.registry promote support-faq 1 --force --reason "hand-checked on 50 queries"
  python -m retrieval_lora.registry promote scifact 3 --reason "beats v2 on nDCG@10"
  python -m retrieval_lora.registry rollback scifact

registry folder: --registry DIR, else ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval_lora.registry", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", metavar="DIR", help="registry folder (default: $%s or ./%s)"
                        % (REGISTRY_ENV, DEFAULT_REGISTRY))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="every adapter name, its versions and the promoted one")
    show = commands.add_parser("show", help="manifest, metrics, gate decision and history of a version")
    show.add_argument("spec", help="NAME (the promoted version), NAME@N or NAME@latest")
    show.add_argument("--json", action="store_true", help="print machine-readable JSON")
    register = commands.add_parser("register", help="add an adapter folder as NAME's next version (no gate runs)")
    register.add_argument("name")
    register.add_argument("adapter_dir", type=Path, help="folder with the adapter files and retrieval_lora.json")
    register.add_argument("--base", help="base model to check the adapter against (default: the one it records)")
    register.add_argument("--metrics", type=Path, metavar="FILE", help="JSON/YAML/TOML file of metrics to keep with it")
    register.add_argument("--report", type=Path, metavar="DIR", help="report folder to keep with it")
    promote = commands.add_parser("promote", help="make a version the one served for NAME")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", help="why, recorded in the history")
    promote.add_argument("--force", action="store_true", help="promote a version whose gate failed or never ran "
                         "(marked as forced in the history)")
    rollback = commands.add_parser("rollback", help="go back to the version promoted before the current one")
    rollback.add_argument("name")
    rollback.add_argument("--reason", help="why, recorded in the history")
    return parser


def _describe(version: AdapterVersion, registry: Registry) -> dict:
    manifest, decision = version.manifest(), version.decision()
    return {
        "spec": version.spec, "path": str(version.path), "adapter_dir": str(version.adapter_dir),
        "promoted": getattr(registry.promoted(version.name), "version", None) == version.version,
        "task": manifest.get("task"), "base_model": manifest.get("base_model"),
        "base_fingerprint": manifest.get("base_fingerprint"), "dataset_fingerprint": manifest.get("dataset_fingerprint"),
        "created_at": manifest.get("created_at"), "git_commit": manifest.get("git_commit"),
        "metrics": version.metrics(), "decision": decision,
        "report": str(version.report_dir) if version.report_dir.is_dir() else None,
        "history": registry.history(version.name),
    }


def _print_show(info: dict) -> None:
    print(f"{info['spec']}{'  (promoted)' if info['promoted'] else ''}\n  folder: {info['path']}")
    for key in ("task", "base_model", "base_fingerprint", "dataset_fingerprint", "created_at", "git_commit", "report"):
        print(f"  {key}: {info[key]}")
    decision = info["decision"]
    if decision:
        print(f"  gate: {dict(passed='PASSED', failed='FAILED', none='NONE (no gate ran)')[gate_state(decision)]}")
        for reason in decision.get("reasons", []):
            print(f"    - {reason}")
    if info["metrics"]:
        print("  metrics: " + json.dumps(info["metrics"], sort_keys=True)[:2000])
    print("  history:" + ("" if info["history"] else " (no promotions yet)"))
    for entry in info["history"]:
        fields = ("seq", "action", "version", "previous", "at", "user", "forced", "gate", "reason")
        print("    " + " ".join(f"{key}={entry[key]}" for key in fields if entry.get(key) is not None))


def _list(registry: Registry) -> None:
    names = registry.names()
    if not names:
        print(f"registry {registry.root} holds no adapters")
    for name in names:
        promoted = registry.promoted(name)
        versions = ", ".join(f"{v.version}{'*' if promoted and v.version == promoted.version else ''}"
                             for v in registry.versions(name))
        print(f"{name}: versions {versions}  (promoted: {promoted.version if promoted else 'none'})")


def main(argv: list[str] | None = None) -> int:
    """Run one registry command from `argv` (default: `sys.argv[1:]`); returns the exit status 0.

    Raises:
        RegistryError: unknown name, version or spec, no passed gate without --force, nothing to roll back.
        AdapterError: `register` of a folder that is incomplete or does not load onto its base.
        SystemExit: bad arguments (argparse prints the usage).
    """
    args = build_parser().parse_args(argv)
    registry = Registry(args.registry)
    if args.command == "list":
        _list(registry)
    elif args.command == "show":
        info = _describe(registry.resolve(args.spec), registry)
        print(json.dumps(info, indent=2, sort_keys=True)) if args.json else _print_show(info)
    elif args.command == "register":
        _register(registry, args)
    elif args.command == "promote":
        version = registry.promote(args.name, args.version, reason=args.reason, force=args.force)
        print(f"promoted {version.spec} ({version.adapter_dir})")
    else:
        version = registry.rollback(args.name, reason=args.reason)
        print(f"rolled back {args.name} to version {version.version} ({version.adapter_dir})")
    return 0


def _register(registry: Registry, args: argparse.Namespace) -> None:
    metadata = check_adapter(args.adapter_dir, args.base)
    metrics = _read_metrics(args.metrics) if args.metrics else None
    version = registry.register(args.name, args.adapter_dir, metrics=metrics, decision=dict(NO_GATE),
                                report_dir=args.report)
    print(f"registered {version.spec} ({metadata.task} for base {metadata.base_model}, checked: it loads onto a base "
          f"with fingerprint {metadata.base_fingerprint}); no gate ran, so promote it with "
          f"`promote {args.name} {version.version} --force`")


def _read_metrics(path: Path) -> dict:
    if path.suffix != ".json":
        return read_config_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"--metrics {path} cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"--metrics {path} must hold an object of metric names to values")
    return data
