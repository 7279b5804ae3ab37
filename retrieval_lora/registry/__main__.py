"""`python -m retrieval_lora.registry list|show|register|promote|rollback` (the commands are in cli.py)."""

from retrieval_lora.cli import run_cli
from retrieval_lora.registry.cli import main

run_cli(main)
