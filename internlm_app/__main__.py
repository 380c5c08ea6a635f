"""Entry point: python -m internlm_app."""

from internlm_app.cli import run

run()
