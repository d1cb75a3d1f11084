"""The `swiftsvd` command line: thin commands that build options, call a stage and print a summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from swiftsvd_cli import __version__
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import console, setup_logging

app = typer.Typer(
    name="swiftsvd",
    help="Swift-SVD: closed-form, activation-aware optimal low-rank compression of LLMs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[str, typer.Argument(help="Hub id, local HF directory, .gguf file, or 'demo' (bundled SmolLM2-135M).")]
DataOpt = Annotated[
    str, typer.Option("--data", help="wikitext2 | c4 | ptb | demo (bundled Brown Corpus) | PATH (.txt, .jsonl).")
]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, checkpoint dtype on GPU).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of MODEL.")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact made with other settings.")]


def user_errors(command: F) -> F:
    """Print a `SwiftSVDError` as one red line and exit 1: users never see a traceback for their mistakes."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(verbose=False)
        try:
            return command(*args, **kwargs)
        except SwiftSVDError as error:
            console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: finished artifacts are kept; rerun to resume[/yellow]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"swiftsvd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Swift-SVD: closed-form, activation-aware optimal low-rank compression of LLMs.

    Pipeline: calibrate (Grams) -> allocate (eigenbases + rank plan) -> compress (checkpoint) -> eval.
    """


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


@app.command()
@user_errors
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="WORK directory for the covariance shards.")],
    data: DataOpt = "wikitext2",
    samples: Annotated[int, typer.Option(help="Calibration windows (the field uses 256).")] = 256,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (the field uses 2048).")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the random window positions.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Accumulate float64 input Grams per layer and input group; resumes an interrupted run."""
    from swiftsvd_cli.calibrate import CalibrateOptions, run_calibrate

    options = CalibrateOptions(model=model, work=out, data=data, samples=samples, seqlen=seqlen, seed=seed,
                               batch_size=batch_size, dtype=dtype, device=device, revision=revision,
                               trust_remote_code=trust_remote_code, force=force)
    result = run_calibrate(options)
    manifest = result.manifest
    importance = manifest.importance()
    table = Table(title=f"calibration of {manifest.model.model_id}", show_header=False)
    table.add_row("layers", f"{len(manifest.layers)} ({len(result.computed_layers)} computed, "
                            f"{len(manifest.layers) - len(result.computed_layers)} reused)")
    table.add_row("tokens", f"{manifest.layers[0].tokens:,} ({manifest.settings.samples} x {manifest.settings.seqlen})")
    table.add_row("data", manifest.settings.data_id)
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("disk", _size(result.disk_bytes))
    table.add_row("importance", f"{min(importance):.4f} .. {max(importance):.4f}")
    table.add_row("output", str(out))
    console.print(table)


@app.command()
@user_errors
def env() -> None:
    """Versions and devices: paste this into a bug report."""
    import platform

    import accelerate
    import torch
    import transformers

    table = Table(title="swiftsvd environment", show_header=False)
    table.add_row("swiftsvd", __version__)
    table.add_row("python", sys.version.split()[0])
    table.add_row("platform", platform.platform())
    for module in (torch, transformers, accelerate):
        table.add_row(module.__name__, module.__version__)
    table.add_row("cuda", str(torch.version.cuda) if torch.cuda.is_available() else "not available")
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        table.add_row(f"cuda:{index}", f"{properties.name}, {_size(properties.total_memory)}")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    console.print(table)
