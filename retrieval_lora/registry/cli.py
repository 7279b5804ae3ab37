"""`python -m retrieval_lora.registry list|show|promote|rollback`: look at and steer the registry.

The registry folder is `--registry DIR`, else `$RETRIEVAL_LORA_REGISTRY`, else `./registry`.
"""
# This docstring is the `--help` description. `__main__.py` runs `main`; the registry package
# (`retrieval_lora/registry/__init__.py`) never imports this module, so there is no import cycle.

from __future__ import annotations

import argparse
import json

from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, AdapterVersion, Registry

EPILOG = f"""examples:
  python -m retrieval_lora.registry list
  python -m retrieval_lora.registry show scifact            # the promoted version
  python -m retrieval_lora.registry show scifact@2
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
    promote = commands.add_parser("promote", help="make a version the one served for NAME")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", help="why, recorded in the history")
    promote.add_argument("--force", action="store_true", help="promote even though its gate decision failed")
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
        print(f"  gate: {'PASSED' if decision.get('passed') else 'FAILED'}")
        for reason in decision.get("reasons", []):
            print(f"    - {reason}")
    if info["metrics"]:
        print("  metrics: " + json.dumps(info["metrics"], sort_keys=True)[:2000])
    print("  history:" + ("" if info["history"] else " (no promotions yet)"))
    for entry in info["history"]:
        fields = ("seq", "action", "version", "previous", "at", "user", "reason")
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
        RegistryError: unknown name, version or spec, a failed gate without --force, nothing to roll back.
        SystemExit: bad arguments (argparse prints the usage).
    """
    args = build_parser().parse_args(argv)
    registry = Registry(args.registry)
    if args.command == "list":
        _list(registry)
    elif args.command == "show":
        info = _describe(registry.resolve(args.spec), registry)
        print(json.dumps(info, indent=2, sort_keys=True)) if args.json else _print_show(info)
    elif args.command == "promote":
        version = registry.promote(args.name, args.version, reason=args.reason, force=args.force)
        print(f"promoted {version.spec} ({version.adapter_dir})")
    else:
        version = registry.rollback(args.name, reason=args.reason)
        print(f"rolled back {args.name} to version {version.version} ({version.adapter_dir})")
    return 0
