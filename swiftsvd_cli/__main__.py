"""`python -m swiftsvd_cli` runs the CLI, and so does `torchrun --nproc_per_node N -m swiftsvd_cli` (tested)."""

from swiftsvd_cli.cli import app

app()
