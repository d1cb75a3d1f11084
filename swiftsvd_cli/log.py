"""Rich logging and progress bars: one console for the whole tool, so bars and log lines never interleave."""

from __future__ import annotations

import functools
import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
logger = logging.getLogger("swiftsvd")


def setup_logging(verbose: bool = False) -> None:
    """Attach one RichHandler to the `swiftsvd` logger (idempotent)."""
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, markup=False))
    logger.propagate = False
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our rich bars are the progress; HF's per-shard tqdm bars are noise
    hub_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # offline retries would print a warning line before our one-line error
    # transformers imports torchao (when installed) at every model load; on CPU builds torchao warns that its
    # CUDA-only libraries do not load, and torch that torchao registers enums the deprecated way: not actionable
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def progress() -> Progress:
    """A progress bar for per-layer loops (hidden when stderr is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (params), with `unit` 'B' -> '1.18 MiB' (bytes)."""
    if unit == "B":
        for prefix in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or prefix == "GiB":
                return f"{value:.0f} B" if prefix == "B" else f"{value:.2f} {prefix}"
            value /= 1024
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


human_bytes = functools.partial(human, unit="B")
