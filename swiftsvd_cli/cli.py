"""The `swiftsvd` command line: thin commands that build options, call a stage and print a summary.

Every command also takes `--config NAME_OR_PATH` (a recipe, swiftsvd_cli.recipes; explicit flags win) and
`--verbose` (the debug log), added by `command`. Heavy modules (torch, transformers, the stages) are imported
inside the command bodies, so `--help` stays fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from swiftsvd_cli import __version__, config
from swiftsvd_cli.config import DType, FactorDType, GramProducts, KVCache, Method, Offload, Sampler, Strategy
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import console, setup_logging
from swiftsvd_cli.recipes import KEYS, coerce, load_recipe

app = typer.Typer(
    name="swiftsvd",
    help="Swift-SVD: closed-form, activation-aware optimal low-rank compression of LLMs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])
ONE_SHOT = "One shot (--ratio, --bytes-ratio or --target-ppl)"  # help panel of one-shot options, refused with --plan
DEMO_DEFAULT = "demo: configs/demo.yaml's"
SKIP_NONFINITE_HELP = (
    "Leave out calibration windows whose activations overflow (NaN/Inf) instead of stopping; the WORK's manifest "
    "lists them per layer."
)


def _device(value: str | None) -> str | None:
    try:
        return config.check_device(value)
    except SwiftSVDError as error:
        raise typer.BadParameter(str(error)) from None


ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Hub id, local HF directory, .gguf file, or 'demo' (bundled SmolLM2-135M); or `model` in --config.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    str, typer.Option("--data", help="wikitext2 | c4 | ptb | demo (bundled Brown Corpus) | PATH (.txt, .jsonl).")
]
DtypeOpt = Annotated[DType, typer.Option(help="auto: float32 on CPU, the checkpoint's dtype on GPU.")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="cpu, cuda, cuda:1, mps ... (default: cuda if available); auto: the same, and in one process "
        "(no launcher) the eigendecompositions spread over every visible GPU.",
        callback=_device,
    ),
]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of MODEL.")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact made with other settings.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random calibration window positions.")]
SamplerOpt = Annotated[
    Sampler,
    typer.Option(
        help="tokens: seeded token windows at random positions of the tokenised text (ours). svd-llm: SVD-LLM's "
        "get_calib_train_data draw for draw (Python random character offsets, each slice tokenised alone, so a "
        "BOS per window where the tokenizer adds one)."
    ),
]
BatchOpt = Annotated[int, typer.Option(help="Calibration windows per forward pass.")]
RatioOpt = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the compressed linears' parameters KEPT (paper convention): 1.0 = original, 0.4 keeps 40%."
    ),
]
BytesRatioOpt = Annotated[
    float | None,
    typer.Option(
        help="Instead of --ratio: share of the target linears' 16-bit bytes to keep (0.5 = half a bf16 model); "
        "picks the largest ranks that fit with --factor-dtype."
    ),
]
FactorDtypeOpt = Annotated[
    FactorDType | None,
    typer.Option(
        help="int8: factors (and target linears left dense) as int8 codes + float32 row scales (torchao "
        "round-to-nearest); also what --bytes-ratio counts. Default: the model's dtype (with --plan: the plan's)."
    ),
]
TargetPplOpt = Annotated[
    float | None,
    typer.Option(
        help="Instead of --ratio: the smallest ratio (steps of 0.01) whose validation perplexity is at most this, "
        "found by bisection on the cached eigenbases (at most 8 evaluations on the validation split, never the "
        "text eval reports). A target below the uncompressed model's validation perplexity stops with a message."
    ),
]
StrategyOpt = Annotated[
    Strategy,
    typer.Option(
        help="dynamic: paper Algorithm 2 per matrix type, alpha by validation perplexity. uniform: one rank per "
        "matrix shape. global: eigen-directions across all matrices and layers by importance-weighted relative "
        "loss per parameter, each matrix keeping delta x the uniform rank."
    ),
]
AlphaOpt = Annotated[float | None, typer.Option(help="Fix Algorithm 2's alpha in [0, 1] and skip the grid search.")]
DeltaOpt = Annotated[
    float, typer.Option(help="Guaranteed share of the uniform rank per matrix, dynamic and global (paper: 0.5).")
]
ValSamplesOpt = Annotated[
    int,
    typer.Option(
        help="Validation windows (of the calibration seqlen, evenly spaced over the validation text) per alpha "
        "candidate; the default is 32,768 tokens at seqlen 2048."
    ),
]
MethodOpt = Annotated[
    Method,
    typer.Option(
        help="swift (ours, optimal) | svd (plain SVD of W) | asvd (ASVD's scaling at the plan's ranks, not its "
        "sensitivity-based rank search) | svd-llm (SVD-LLM's whitening at its released code's precisions) | "
        "svd-llm-fp64 (ours: the same whitening in float64). Every method gets the plan's ranks: with "
        "--strategy dynamic that is Swift-SVD's Algorithm 2 plan (alpha scored with this method); "
        "--strategy uniform gives SVD-LLM its paper's ranks, the 'SVD-LLM (W)' row."
    ),
]
CONTEXT = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
CONFIG = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Recipe: a shipped name (demo, paper, llama-2-7b, llama-3-8b, mistral-7b, qwen2.5-7b) or a YAML "
            "path. Explicit flags win.",
        ),
    ],
)
VERBOSE = inspect.Parameter(
    "verbose",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--verbose", "-v", help="Show the debug log.")],
)
KeepInputGramsOpt = Annotated[
    bool,
    typer.Option(
        "--keep-input-grams",
        help="Keep every input Gram, also where the output Grams are smaller (needed by --method svd-llm and "
        "svd-llm-fp64).",
    ),
]
OffloadOpt = Annotated[
    Offload, typer.Option(help="Where calibration hidden states wait between layers (disk: a memory-mapped file).")
]


def command(*, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Make `body` a command: --config and --verbose, recipe values for options not given, user errors as one line.

    A recipe sets the options of `body` named like its keys (minus `skip`), unless given on the command line.
    A `SwiftSVDError` is printed as one red line with exit code 1: users never see a traceback for their mistakes.
    """

    def decorate(body: F) -> F:
        signature = inspect.signature(body, eval_str=True)
        settable = {name: p.annotation for name, p in signature.parameters.items() if name in KEYS and name not in skip}
        passes_context = "ctx" in signature.parameters  # the body reads the command line itself

        @wraps(body)
        def wrapper(
            *args: Any, ctx: typer.Context, config: str | None = None, verbose: bool = False, **kwargs: Any
        ) -> Any:
            setup_logging(verbose=verbose)
            from swiftsvd_cli import distributed

            console.quiet = not distributed.is_main()  # under a launcher one process speaks (its errors are everyone's)
            try:
                if config is not None:
                    recipe = load_recipe(config)
                    for key, value in recipe.values.items():
                        if key in settable and not _given(ctx, key):
                            kwargs[key] = coerce(value, settable[key], f"{recipe.source}: {key}")
                return body(*args, **kwargs, **({"ctx": ctx} if passes_context else {}))
            except SwiftSVDError as error:
                console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
                distributed.barrier()  # every process has this error: none exits before the main one printed it
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted: finished artifacts are kept; rerun to resume[/yellow]")
                raise typer.Exit(130) from None

        own = [p for name, p in signature.parameters.items() if name != "ctx"]
        wrapper.__signature__ = signature.replace(parameters=[CONTEXT, *own, CONFIG, VERBOSE])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set on the command line (or by its environment variable), not by its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _model(model: str | None) -> str:
    if model is None:
        raise SwiftSVDError("give MODEL (or a --config recipe with a `model` key)")
    return model


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
@command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="WORK directory for the covariance shards.")],
    model: ModelArg = None,
    data: DataOpt = config.DATA,
    samples: Annotated[int, typer.Option(help="Calibration windows (the field uses 256).")] = config.SAMPLES,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (the field uses 2048).")] = config.SEQLEN,
    seed: SeedOpt = config.SEED,
    sampler: SamplerOpt = config.SAMPLER,
    batch_size: BatchOpt = config.BATCH_SIZE,
    keep_input_grams: KeepInputGramsOpt = False,
    offload_hidden: OffloadOpt = config.OFFLOAD,
    gram_precision: Annotated[
        GramProducts,
        typer.Option(
            help="Precision of the Gram products, summed in float64 either way (auto: float64 on data-centre "
            "GPUs, float32 on CPUs and consumer GPUs)."
        ),
    ] = config.GRAM_PRODUCTS,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the disk, host RAM and device memory the run needs, then stop.")
    ] = False,
    dtype: DtypeOpt = config.DTYPE,
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    force: ForceOpt = False,
    skip_nonfinite: Annotated[bool, typer.Option("--skip-nonfinite", help=SKIP_NONFINITE_HELP)] = False,
) -> None:
    """Accumulate float64 Grams per layer and input group, one layer at a time; resumes an interrupted run."""
    from swiftsvd_cli.model.loading import ModelSource
    from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
    from swiftsvd_cli.stages.calibrate import dry_run as plan_run
    from swiftsvd_cli.tables import calibration_table, footprint_table

    source = ModelSource(_model(model), dtype, device, revision, trust_remote_code)
    options = CalibrateOptions(
        source=source,
        work=out,
        data=data,
        samples=samples,
        seqlen=seqlen,
        seed=seed,
        sampler=sampler,
        batch_size=batch_size,
        gram_precision=gram_precision,
        keep_input_grams=keep_input_grams,
        offload_hidden=offload_hidden,
        force=force,
        skip_nonfinite=skip_nonfinite,
    )
    if dry_run:
        console.print(footprint_table(plan_run(options), out))
        return
    console.print(calibration_table(run_calibrate(options), out))


@app.command()
@command(skip=("model",))  # allocate's --model relocates the calibrated model; a recipe's model is a hub id
def allocate(
    work: Annotated[Path, typer.Argument(help="WORK directory written by `swiftsvd calibrate`.")],
    ratio: RatioOpt = None,
    bytes_ratio: BytesRatioOpt = None,
    target_ppl: TargetPplOpt = None,
    factor_dtype: FactorDtypeOpt = None,
    strategy: StrategyOpt = config.STRATEGY,
    alpha: AlphaOpt = None,
    delta: DeltaOpt = config.DELTA,
    method: MethodOpt = config.METHOD,
    model: Annotated[str | None, typer.Option(help="Model, if not where WORK says (e.g. moved directory).")] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            help="Data whose validation split scores the alpha grid and --target-ppl (never its test split, which "
            "eval reports): "
            "wikitext2 | ptb | c4 | demo | PATH (a file is used whole). Default: the calibration data's "
            "validation split; for a calibration file, that file itself."
        ),
    ] = None,
    val_samples: ValSamplesOpt = config.VAL_SAMPLES,
    name: Annotated[
        str | None,
        typer.Option(help="Plan name (default ratio-R-STRATEGY, bytes-B-DTYPE-STRATEGY or target-ppl-P-STRATEGY)."),
    ] = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing plan of that name.")] = False,
) -> None:
    """Eigenbases (computed once, cached in WORK) and a rank plan for a ratio, byte budget or target perplexity."""
    from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
    from swiftsvd_cli.tables import allocation_summary, plan_table

    options = AllocateOptions(
        work=work,
        ratio=ratio,
        bytes_ratio=bytes_ratio,
        target_ppl=target_ppl,
        factor_dtype=factor_dtype,
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
    result = run_allocate(options)
    console.print(plan_table(result.plan))
    console.print(allocation_summary(result), highlight=False)


@app.command()
@command()
def compress(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the compressed model.")],
    model: ModelArg = None,
    plan: Annotated[
        Path | None,
        typer.Option(help="Rank plan from `swiftsvd allocate` (else --ratio, --bytes-ratio or --target-ppl)."),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option(help="One shot: calibrate/allocate as needed, then compress. Fraction of parameters KEPT."),
    ] = None,
    bytes_ratio: BytesRatioOpt = None,
    target_ppl: Annotated[
        float | None,
        typer.Option(
            help="One shot, instead of --ratio: the smallest ratio whose validation perplexity is at most this "
            "(see `swiftsvd allocate --help`)."
        ),
    ] = None,
    factor_dtype: FactorDtypeOpt = None,
    method: MethodOpt = config.METHOD,
    merge: Annotated[
        bool, typer.Option("--merge", help="Write a plain dense checkpoint (loads without swiftsvd).")
    ] = False,
    compensate: Annotated[
        bool,
        typer.Option(
            "--compensate",
            help="Error-compensated factors: one more layer-by-layer pass over the calibration windows fits each "
            "matrix to reproduce the original outputs both from the inputs the already compressed layers produce "
            "and from the original inputs (closed form, Swift-SVD factors only; with int8 factors, to the int8 "
            "layers' inputs). Ratio-specific: computed for this plan, recorded in the output directory, never "
            "cached in WORK. Costs several calibration passes; demo results in the README.",
        ),
    ] = False,
    kv_cache: Annotated[
        KVCache,
        typer.Option(
            help="dense: cache keys and values. latent: cache the k/v latents B x (less KV memory; keys rebuilt "
            "and rotated with each token's own position, exact)."
        ),
    ] = config.KV_CACHE,
    kv_ratio: Annotated[
        float | None,
        typer.Option(
            help="With --kv-cache latent: fraction of the KV cache KEPT; caps every k/v rank at "
            "floor(kv_ratio * num_kv_heads * head_dim) on top of the plan."
        ),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="WORK directory (default: a cache folder per model and settings).", rich_help_panel=ONE_SHOT),
    ] = None,
    strategy: Annotated[Strategy, typer.Option(help="Rank allocation.", rich_help_panel=ONE_SHOT)] = config.STRATEGY,
    alpha: Annotated[
        float | None, typer.Option(help="Fix Algorithm 2's alpha in [0, 1].", rich_help_panel=ONE_SHOT)
    ] = None,
    delta: Annotated[float, typer.Option(help="Algorithm 2's delta.", rich_help_panel=ONE_SHOT)] = config.DELTA,
    data: Annotated[
        str | None,
        typer.Option(help=f"Calibration data (default {config.DATA}; {DEMO_DEFAULT}).", rich_help_panel=ONE_SHOT),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(help=f"Calibration windows (default {config.SAMPLES}; {DEMO_DEFAULT}).", rich_help_panel=ONE_SHOT),
    ] = None,
    seqlen: Annotated[
        int | None,
        typer.Option(help=f"Tokens per window (default {config.SEQLEN}; {DEMO_DEFAULT}).", rich_help_panel=ONE_SHOT),
    ] = None,
    seed: Annotated[int, typer.Option(help="Calibration window seed.", rich_help_panel=ONE_SHOT)] = config.SEED,
    batch_size: Annotated[
        int, typer.Option(help="Calibration windows per forward pass.", rich_help_panel=ONE_SHOT)
    ] = config.BATCH_SIZE,
    val_samples: Annotated[
        int | None,
        typer.Option(
            help=f"Validation windows per alpha (default {config.VAL_SAMPLES}; {DEMO_DEFAULT}).",
            rich_help_panel=ONE_SHOT,
        ),
    ] = None,
    keep_input_grams: Annotated[
        bool,
        typer.Option(
            "--keep-input-grams", help="Keep every input Gram (for svd-llm methods).", rich_help_panel=ONE_SHOT
        ),
    ] = False,
    offload_hidden: Annotated[
        Offload, typer.Option(help="Where calibration hidden states wait.", rich_help_panel=ONE_SHOT)
    ] = config.OFFLOAD,
    dtype: DtypeOpt = config.DTYPE,
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    skip_nonfinite: Annotated[
        bool, typer.Option("--skip-nonfinite", help=SKIP_NONFINITE_HELP, rich_help_panel=ONE_SHOT)
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
) -> None:
    """Compress MODEL by a plan (--plan) or in one shot (--ratio / --bytes-ratio / --target-ppl), into a checkpoint."""
    from swiftsvd_cli.model.loading import ModelSource
    from swiftsvd_cli.stages.compress import CompressOptions
    from swiftsvd_cli.stages.pipeline import OneShotOptions, compress
    from swiftsvd_cli.tables import compression_table, plan_table

    targets = {"--plan": plan, "--ratio": ratio, "--bytes-ratio": bytes_ratio, "--target-ppl": target_ppl}
    if len(chosen := [flag for flag, value in targets.items() if value is not None]) != 1:
        raise SwiftSVDError(
            "give exactly one of --plan PLAN, --ratio RATIO, --bytes-ratio RATIO or --target-ppl PPL"
            + (f" ({' and '.join(chosen)} given)" if chosen else "")
        )
    if plan is not None and (given := _given_in_panel(ctx, ONE_SHOT)):
        raise SwiftSVDError(
            f"{', '.join(given)} only apply to the one shot (--ratio, --bytes-ratio or --target-ppl), not to --plan"
        )
    source = ModelSource(_model(model), dtype, device, revision, trust_remote_code)
    options: CompressOptions | OneShotOptions
    if plan is not None:
        options = CompressOptions(
            source=source,
            out=out,
            plan=plan,
            method=method,
            merge=merge,
            compensate=compensate,
            force=force,
            factor_dtype=factor_dtype,
            kv_cache=kv_cache,
            kv_ratio=kv_ratio,
        )
    else:
        options = OneShotOptions(
            source=source,
            ratio=ratio,
            bytes_ratio=bytes_ratio,
            target_ppl=target_ppl,
            factor_dtype=factor_dtype,
            out=out,
            work=work,
            strategy=strategy,
            alpha=alpha,
            delta=delta,
            method=method,
            merge=merge,
            compensate=compensate,
            kv_cache=kv_cache,
            kv_ratio=kv_ratio,
            data=data,
            samples=samples,
            seqlen=seqlen,
            val_samples=val_samples,
            seed=seed,
            batch_size=batch_size,
            keep_input_grams=keep_input_grams,
            offload_hidden=offload_hidden,
            skip_nonfinite=skip_nonfinite,
            force=force,
        )
    result = compress(options)
    console.print(plan_table(result.plan))
    console.print(compression_table(result, method, merge))


def _given_in_panel(ctx: typer.Context, panel: str) -> list[str]:
    """The options of help panel `panel` set on the command line (recipe values do not count)."""
    return [
        f"--{param.name.replace('_', '-')}"
        for param in ctx.command.params
        if getattr(param, "rich_help_panel", None) == panel and param.name is not None and _given(ctx, param.name)
    ]


@app.command("eval")
@command()
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
            help="Comma list: perplexity data (wikitext2, ptb, c4 as SVD-LLM builds them; c4-gptq as GPTQ's "
            "--new-eval; demo; PATH.txt/.jsonl) and/or lm-eval "
            "tasks (openbookqa, arc_easy, arc_challenge, winogrande, hellaswag, piqa, mathqa, ...).",
        ),
    ] = config.EVAL_TASKS,
    seqlen: Annotated[int, typer.Option(help="Perplexity window length (the field uses 2048).")] = config.SEQLEN,
    limit: Annotated[int | None, typer.Option(help="Only the first N perplexity windows per dataset.")] = None,
    zeroshot_limit: Annotated[int | None, typer.Option(help="Only the first N examples per zero-shot task.")] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="Folder of extra lm-eval task YAMLs (e.g. local, offline tasks).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Windows (or lm-eval requests) per forward pass.")
    ] = config.EVAL_BATCH_SIZE,
    bench: Annotated[
        bool,
        typer.Option("--bench", help="Also measure prefill/decode tokens/s, peak memory and KV cache bytes per token."),
    ] = False,
    bench_prompt_len: Annotated[int, typer.Option(help="Prompt tokens for --bench.")] = config.BENCH_PROMPT_LEN,
    bench_new_tokens: Annotated[int, typer.Option(help="Greedy new tokens for --bench.")] = config.BENCH_NEW_TOKENS,
    bench_batch_size: Annotated[
        int, typer.Option(help="Sequences per generate call for --bench (e.g. 8 with 512 + 512 tokens: KV memory).")
    ] = config.BENCH_BATCH_SIZE,
    bench_repeats: Annotated[int, typer.Option(help="Timed repeats for --bench (median).")] = config.BENCH_REPEATS,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON report here.")] = None,
    dtype: DtypeOpt = config.DTYPE,
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
        bench_batch_size=bench_batch_size,
        bench_repeats=bench_repeats,
        output=output,
        force=force,
    )
    console.print(render_table(evaluate(options)))


@app.command()
@command(skip=("model",))  # report's --model relocates the calibrated model; a recipe's model is a hub id
def report(
    work: Annotated[Path, typer.Argument(help="WORK directory written by `swiftsvd calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the plots and README.md summary.")],
    plan: Annotated[Path | None, typer.Option(help="Also plot this rank plan's ranks per layer.")] = None,
    model: Annotated[str | None, typer.Option(help="Model, if WORK has no eigenbases yet and it moved.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Spectra, NER vs layer importance and rank plots plus a markdown summary: where is the model compressible?"""
    from swiftsvd_cli.stages.report import ReportOptions, run_report
    from swiftsvd_cli.tables import report_table

    result = run_report(ReportOptions(work=work, out=out, plan=plan, model=model, device=device))
    console.print(report_table(result))
    console.print(f"{len(result.figures)} figures in {out}", highlight=False)


@app.command()
@command()
def env() -> None:
    """Versions and devices: paste this into a bug report."""
    from swiftsvd_cli.tables import env_table

    console.print(env_table())
