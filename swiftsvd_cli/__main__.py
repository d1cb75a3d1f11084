"""`python -m swiftsvd_cli` (and `accelerate launch -m swiftsvd_cli`) runs the CLI."""

from swiftsvd_cli.cli import app

app()
