"""`python -m swiftsvd_cli` runs the CLI; so do `torchrun --nproc_per_node N -m swiftsvd_cli` and `accelerate launch
--multi_gpu --num_processes N -m swiftsvd_cli` (tests/test_distributed.py launches both)."""

from swiftsvd_cli.cli import app

app()
