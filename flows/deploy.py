"""Run the `specialize` flow on a cron schedule: in this process (`serve`), or through a work pool.

    prefect server start                                         # terminal 1: API + UI on :4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api             # terminal 2:
    python -m flows.deploy --config flows/nightly.yaml --cron "0 2 * * *"

With `serve` the schedule lives as long as this process does (stopping it pauses the deployment).
For a schedule that outlives a terminal, deploy to a process work pool once and keep a worker
running (as a systemd service, in tmux, in a container: whatever restarts it):

    prefect work-pool create retrieval-lora --type process
    python -m flows.deploy --config flows/nightly.yaml --pool retrieval-lora    # registers and returns
    prefect worker start --pool retrieval-lora                                   # from the repository root

The worker heartbeats, so Prefect marks a run whose process was killed as Crashed instead of
leaving it Running.

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
from pathlib import Path

import flows  # noqa: F401  (telemetry off before Prefect loads)
from flows.specialize import parameters_from_args, specialize

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night
REPO = Path(__file__).resolve().parents[1]


def build_deployment(parameters: dict, *, name: str, cron: str, timezone: str | None = None):
    """The deployment of `specialize` with `parameters` as defaults and one cron schedule."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    # A module path, not a file path: runs then import `flows.specialize` the way the CLI does.
    return specialize.to_deployment(name=name, schedule=Cron(cron, timezone=timezone), parameters=parameters,
                                    description="Specialize an adapter on a schedule; promote it if it passes the gate",
                                    tags=["retrieval-lora"], entrypoint_type=EntrypointType.MODULE_PATH)


def deploy_to_pool(parameters: dict, *, name: str, cron: str, pool: str, timezone: str | None = None):
    """Register the deployment with the work pool `pool` (code pulled from this repository folder); returns its id."""
    from prefect.schedules import Cron

    source = specialize.from_source(source=str(REPO), entrypoint="flows/specialize.py:specialize")
    return source.deploy(name=name, work_pool_name=pool, schedule=Cron(cron, timezone=timezone), parameters=parameters,
                         description="Specialize an adapter on a schedule; promote it if it passes the gate",
                         tags=["retrieval-lora"], print_next_steps=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", help="IANA time zone of the schedule (default: UTC)")
    parser.add_argument("--deployment", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--pool", help="deploy to this process work pool and return (run `prefect worker start "
                                        "--pool NAME` to execute it) instead of serving in this process")
    args, rest = parser.parse_known_args(argv)
    parameters = parameters_from_args(rest)
    if args.pool:
        deployment_id = deploy_to_pool(parameters, name=args.deployment, cron=args.cron, pool=args.pool,
                                       timezone=args.timezone)
        print(f"Deployment {deployment_id} registered with pool {args.pool!r}; start a worker from {REPO}:\n"
              f"  prefect worker start --pool {args.pool}")
        return 0
    from prefect import serve

    serve(build_deployment(parameters, name=args.deployment, cron=args.cron, timezone=args.timezone))
    return 0


if __name__ == "__main__":
    from retrieval_lora.cli import run_cli

    run_cli(main)
