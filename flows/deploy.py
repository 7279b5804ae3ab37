"""Serve the `specialize` flow on a cron schedule (a long-running process that starts each run).

    prefect server start                                         # terminal 1: API + UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api             # terminal 2:
    python -m flows.deploy --config flows/nightly.yaml --cron "0 2 * * *"

Schedules need a Prefect server (the temporary per-run API cannot hold them): the server's
scheduler creates a run at each cron time and this process executes it. Runs, task states,
the report artifact and the metrics table appear in the UI. Because every step is cached by
fingerprints, a nightly run over a dataset folder that has not changed finishes in seconds
("training: skipped"), and a changed folder retrains, evaluates and promotes or rejects.

`--config` holds the flow's parameters (see `python -m flows.specialize --help`); they become
the deployment's defaults, editable per run in the UI's form.
"""

from __future__ import annotations

import argparse

import flows  # noqa: F401  (telemetry off before Prefect loads)
from flows.specialize import parameters_from_args, specialize

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night


def build_deployment(parameters: dict, *, name: str, cron: str, timezone: str | None = None):
    """The deployment of `specialize` with `parameters` as defaults and one cron schedule."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    # A module path, not a file path: runs then import `flows.specialize` the way the CLI does.
    return specialize.to_deployment(name=name, schedule=Cron(cron, timezone=timezone), parameters=parameters,
                                    description="Specialize an adapter on a schedule; promote it if it passes the gate",
                                    tags=["retrieval-lora"], entrypoint_type=EntrypointType.MODULE_PATH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", help="IANA time zone of the schedule (default: UTC)")
    parser.add_argument("--deployment", default="nightly", help="deployment name (default: nightly)")
    args, rest = parser.parse_known_args(argv)
    parameters = parameters_from_args(rest)
    from prefect import serve

    serve(build_deployment(parameters, name=args.deployment, cron=args.cron, timezone=args.timezone))
    return 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
