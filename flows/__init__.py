"""Prefect flows that wire the retrieval_lora stages together; no stage logic lives here.

Telemetry is switched off before Prefect is first imported (set the variables yourself to
override). With no `PREFECT_API_URL` set, a run starts Prefect's temporary local API server,
so nothing needs to be running beforehand.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary API server migrates its database on first start; on a busy machine that takes
# longer than Prefect's default 20 s wait.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
