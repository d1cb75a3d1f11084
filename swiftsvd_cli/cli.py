"""The `swiftsvd` command line: thin commands that build options, call a stage and print a summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from swiftsvd_cli import __version__, config
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import console, setup_logging
from swiftsvd_cli.tables import human_bytes, plan_table

app = typer.Typer(
    name="swiftsvd",
    help="Swift-SVD: closed-form, activation-aware optimal low-rank compression of LLMs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str, typer.Argument(help="Hub id, local HF directory, .gguf file, or 'demo' (bundled SmolLM2-135M).")
]
DataOpt = Annotated[
    str, typer.Option("--data", help="wikitext2 | c4 | ptb | demo (bundled Brown Corpus) | PATH (.txt, .jsonl).")
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, checkpoint dtype on GPU).")
]
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


@app.command()
@user_errors
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="WORK directory for the covariance shards.")],
    data: DataOpt = "wikitext2",
    samples: Annotated[int, typer.Option(help="Calibration windows (the field uses 256).")] = config.SAMPLES,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (the field uses 2048).")] = config.SEQLEN,
    seed: Annotated[int, typer.Option(help="Seed of the random window positions.")] = config.SEED,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = config.BATCH_SIZE,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Accumulate float64 input Grams per layer and input group; resumes an interrupted run."""
    from swiftsvd_cli.model.loading import ModelSource
    from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate

    options = CalibrateOptions(
        source=ModelSource(model, dtype, device, revision, trust_remote_code),
        work=out,
        data=data,
        samples=samples,
        seqlen=seqlen,
        seed=seed,
        batch_size=batch_size,
        force=force,
    )
    result = run_calibrate(options)
    manifest = result.manifest
    importance = manifest.importance()
    table = Table(title=f"calibration of {manifest.model.model_id}", show_header=False)
    table.add_row(
        "layers",
        f"{len(manifest.layers)} ({len(result.computed_layers)} computed, "
        f"{len(manifest.layers) - len(result.computed_layers)} reused)",
    )
    table.add_row("tokens", f"{manifest.layers[0].tokens:,} ({manifest.settings.samples} x {manifest.settings.seqlen})")
    table.add_row("data", manifest.settings.data_id)
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("disk", human_bytes(result.disk_bytes))
    table.add_row("importance", f"{min(importance):.4f} .. {max(importance):.4f}")
    table.add_row("output", str(out))
    console.print(table)


RatioOpt = Annotated[
    float,
    typer.Option(
        help="Fraction of the compressed linears' parameters KEPT (paper convention): 1.0 = original, 0.4 keeps 40%."
    ),
]
StrategyOpt = Annotated[
    str, typer.Option(help="dynamic (paper Algorithm 2, alpha chosen by validation perplexity) | uniform.")
]
AlphaOpt = Annotated[float | None, typer.Option(help="Fix Algorithm 2's alpha in [0, 1] and skip the grid search.")]
MethodOpt = Annotated[
    str, typer.Option(help="swift (ours, optimal) | svd | asvd | svd-llm (baselines on the same cache).")
]


@app.command()
@user_errors
def allocate(
    work: Annotated[Path, typer.Argument(help="WORK directory written by `swiftsvd calibrate`.")],
    ratio: RatioOpt,
    strategy: StrategyOpt = "dynamic",
    alpha: AlphaOpt = None,
    delta: Annotated[
        float, typer.Option(help="Guaranteed share of the uniform rank per layer (paper: 0.5).")
    ] = config.DELTA,
    method: MethodOpt = "swift",
    model: Annotated[str | None, typer.Option(help="Model, if not where WORK says (e.g. moved directory).")] = None,
    val_data: Annotated[
        str | None, typer.Option(help="Text scoring the alpha grid (default: the calibration text).")
    ] = None,
    val_samples: Annotated[int, typer.Option(help="Validation windows per alpha candidate.")] = config.VAL_SAMPLES,
    name: Annotated[str | None, typer.Option(help="Plan name (default ratio-R-STRATEGY).")] = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing plan of that name.")] = False,
) -> None:
    """Eigenbases (computed once, cached in WORK) and a rank plan for a ratio: WORK/plans/NAME.json."""
    from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate

    result = run_allocate(
        AllocateOptions(
            work=work,
            ratio=ratio,
            strategy=strategy,
            alpha=alpha,
            delta=delta,
            method=method,
            model=model,
            val_data=val_data,
            val_samples=val_samples,
            name=name,
            device=device,
            force=force,
        )
    )
    console.print(plan_table(result.plan))
    console.print(
        f"plan: {result.path}  ({len(result.eigen_computed)} layers eigendecomposed, {result.seconds:.1f} s)",
        highlight=False,
    )


@app.command()
@user_errors
def compress(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the compressed model.")],
    plan: Annotated[Path | None, typer.Option(help="Rank plan from `swiftsvd allocate` (else give --ratio).")] = None,
    ratio: Annotated[
        float | None,
        typer.Option(help="One shot: calibrate/allocate as needed, then compress. Fraction of parameters KEPT."),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="One shot: WORK directory (default: a cache folder per model and settings)."),
    ] = None,
    strategy: StrategyOpt = "dynamic",
    alpha: AlphaOpt = None,
    method: MethodOpt = "swift",
    merge: Annotated[
        bool, typer.Option("--merge", help="Write a plain dense checkpoint (loads without swiftsvd).")
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(help="One shot: calibration data (default wikitext2; demo for the demo model)."),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="One shot: calibration windows (default 256; 64 for demo).")
    ] = None,
    seqlen: Annotated[
        int | None, typer.Option(help="One shot: tokens per window (default 2048; 512 for demo).")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
) -> None:
    """Compress MODEL by a plan (--plan) or in one shot (--ratio), into a loadable low-rank checkpoint."""
    from swiftsvd_cli.model.loading import ModelSource
    from swiftsvd_cli.stages.compress import CompressOptions, run_compress
    from swiftsvd_cli.stages.pipeline import OneShotOptions, run_oneshot

    if (plan is None) == (ratio is None):
        raise SwiftSVDError("give exactly one of --plan PLAN or --ratio RATIO")
    seconds: dict[str, float] = {}
    source = ModelSource(model, dtype, device, revision, trust_remote_code)
    if plan is not None:
        result = run_compress(
            CompressOptions(source=source, out=out, plan=plan, method=method, merge=merge, force=force)
        )
    else:
        assert ratio is not None
        oneshot = run_oneshot(
            OneShotOptions(
                source=source,
                ratio=ratio,
                out=out,
                work=work,
                strategy=strategy,
                alpha=alpha,
                method=method,
                merge=merge,
                data=data,
                samples=samples,
                seqlen=seqlen,
                force=force,
            )
        )
        result, seconds = oneshot.compress, oneshot.stage_seconds
    console.print(plan_table(result.plan))
    table = Table(title=f"compressed {result.plan.model.model_id} -> {result.out}", show_header=False)
    table.add_row("method", method + (" (merged dense)" if merge else ""))
    table.add_row(
        "parameters",
        f"{result.params_before:,} -> {result.params_after:,} "
        f"({result.params_after / result.params_before:.1%} of the model)",
    )
    for stage, value in (seconds or {"compress": result.seconds}).items():
        table.add_row(f"time: {stage}", f"{value:.1f} s")
    console.print(table)


@app.command("eval")
@user_errors
def eval_(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Models to compare, first = baseline: hub id, local dir, .gguf, 'demo', or a compressed dir.",
            show_default=False,
        ),
    ],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            "-t",
            help="Comma list: perplexity data (wikitext2, ptb, c4, demo, PATH.txt/.jsonl) and/or lm-eval "
            "tasks (openbookqa, arc_easy, arc_challenge, winogrande, hellaswag, piqa, mathqa, ...).",
        ),
    ] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Perplexity window length (the field uses 2048).")] = config.SEQLEN,
    limit: Annotated[int | None, typer.Option(help="Only the first N perplexity windows per dataset.")] = None,
    zeroshot_limit: Annotated[int | None, typer.Option(help="Only the first N examples per zero-shot task.")] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="Folder of extra lm-eval task YAMLs (e.g. local, offline tasks).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows (or lm-eval requests) per forward pass.")] = 1,
    bench: Annotated[
        bool, typer.Option("--bench", help="Also measure prefill/decode tokens/s and peak memory.")
    ] = False,
    bench_prompt_len: Annotated[int, typer.Option(help="Prompt tokens for --bench.")] = 128,
    bench_new_tokens: Annotated[int, typer.Option(help="Greedy new tokens for --bench.")] = 32,
    bench_repeats: Annotated[int, typer.Option(help="Timed repeats for --bench (median).")] = 3,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON report here.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Perplexity (SVD-LLM protocol), zero-shot accuracy (lm-eval), size and speed: one column per TARGET."""
    from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate
    from swiftsvd_cli.tables import render_table

    options = EvalOptions(
        targets=tuple(targets),
        tasks=(tasks,),
        seqlen=seqlen,
        limit=limit,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        zeroshot_limit=zeroshot_limit,
        task_include_path=include_path,
        bench=bench,
        bench_prompt_len=bench_prompt_len,
        bench_new_tokens=bench_new_tokens,
        bench_repeats=bench_repeats,
        output=output,
        force=force,
    )
    console.print(render_table(evaluate(options)))


@app.command()
@user_errors
def report(
    work: Annotated[Path, typer.Argument(help="WORK directory written by `swiftsvd calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the plots and README.md summary.")],
    plan: Annotated[Path | None, typer.Option(help="Also plot this rank plan's ranks per layer.")] = None,
    model: Annotated[str | None, typer.Option(help="Model, if WORK has no eigenbases yet and it moved.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Spectra, NER vs layer importance and rank plots plus a markdown summary: where is the model compressible?"""
    from swiftsvd_cli.stages.report import ReportOptions, run_report

    result = run_report(ReportOptions(work=work, out=out, plan=plan, model=model, device=device))
    table = Table(title=f"compressibility report -> {result.summary}")
    for column in ("matrix", "shape", "mean NER", "NER vs importance r"):
        table.add_column(column)
    for summary in result.types:
        table.add_row(
            summary.kind,
            f"{summary.shape[0]}x{summary.shape[1]}",
            f"{summary.mean_ner:.3f}",
            f"{summary.ner_importance_r:+.2f}",
        )
    console.print(table)
    console.print(f"{len(result.figures)} figures in {out}", highlight=False)


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
        table.add_row(f"cuda:{index}", f"{properties.name}, {human_bytes(properties.total_memory)}")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    console.print(table)
