"""The `eval` stage: perplexity, zero-shot accuracy, size and speed of several models, side by side.

Each target (hub id, local directory, `demo`, compressed directory) is loaded in turn, measured, and freed, so
an original model and its compressed versions can be compared on a machine that holds one of them at a time.
The report records the protocol next to the numbers (dataset ids and hashes, seqlen, windows, dtype, device,
versions, model fingerprints): a perplexity without its protocol cannot be compared with anyone's.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from swiftsvd_cli.artifacts.eval_report import EvalReport, TargetReport
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.config import (
    BENCH_BATCH_SIZE,
    BENCH_NEW_TOKENS,
    BENCH_PROMPT_LEN,
    BENCH_REPEATS,
    DTYPE,
    EVAL_BATCH_SIZE,
    EVAL_TASKS,
    SEQLEN,
    DType,
)
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.zeroshot import TASK_ALIASES, ZERO_SHOT_TASKS, canonical_task

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class EvalOptions:
    """Everything `swiftsvd eval` needs; `tasks` items may be comma-separated lists."""

    targets: tuple[str, ...]
    tasks: tuple[str, ...] = (EVAL_TASKS,)
    seqlen: int = SEQLEN
    limit: int | None = None  # perplexity windows per dataset (None: all)
    batch_size: int = EVAL_BATCH_SIZE
    dtype: DType = DTYPE
    device: str | None = None  # None: cuda if available
    trust_remote_code: bool = False
    zeroshot_limit: int | None = None  # examples per zero-shot task (None: all)
    task_include_path: Path | None = None  # extra lm-eval task YAMLs
    bench: bool = False
    bench_prompt_len: int = BENCH_PROMPT_LEN
    bench_new_tokens: int = BENCH_NEW_TOKENS
    bench_batch_size: int = BENCH_BATCH_SIZE  # sequences generated at once (long batched generations show the KV)
    bench_repeats: int = BENCH_REPEATS
    output: Path | None = None
    force: bool = False


def split_tasks(items: tuple[str, ...] | list[str]) -> list[str]:
    """`("wikitext2,ptb", "piqa")` -> `["wikitext2", "ptb", "piqa"]`; blanks and repeats dropped."""
    names = [part.strip() for item in items for part in item.split(",")]
    return list(dict.fromkeys(n for n in names if n))


def classify_tasks(names: list[str], include_path: Path | None = None) -> tuple[list[str], list[str]]:
    """Split task names into perplexity texts and zero-shot tasks; an unknown name is an error listing them.

    Runs before any model is loaded, so a typo costs a second, not a model load.
    """
    from swiftsvd_cli.data.text import PERPLEXITY_DATASETS, TEXT_SUFFIXES

    perplexity: list[str] = []
    zero_shot: list[str] = []
    unresolved: list[str] = []
    for name in names:
        if name in PERPLEXITY_DATASETS:
            perplexity.append(name)
        elif Path(name).suffix in TEXT_SUFFIXES:
            if not Path(name).expanduser().is_file():
                raise SwiftSVDError(f"text file not found: {name}")
            perplexity.append(name)
        elif canonical_task(name) in ZERO_SHOT_TASKS:
            zero_shot.append(canonical_task(name))
        else:
            unresolved.append(name)
    if unresolved:
        from swiftsvd_cli.metrics.zeroshot import known_tasks

        known = known_tasks(unresolved, include_path)  # None without lm-eval: only built-in names are valid
        unknown = [n for n in unresolved if known is None or n not in known]
        if unknown:
            lm_eval_hint = "any lm-eval task" if known is not None else "lm-eval tasks once lm-eval is installed"
            raise SwiftSVDError(
                f"unknown task {', '.join(repr(n) for n in unknown)}: use perplexity data "
                f"{', '.join(PERPLEXITY_DATASETS)} or a .txt/.jsonl file, zero-shot tasks "
                f"{', '.join(ZERO_SHOT_TASKS + tuple(TASK_ALIASES))}, or {lm_eval_hint}"
            )
        zero_shot.extend(unresolved)
    return perplexity, zero_shot


def _check_options(options: EvalOptions) -> None:
    if not options.targets:
        raise SwiftSVDError("no model to evaluate: pass at least one TARGET")
    if options.batch_size < 1 or options.seqlen < 2 or (options.limit is not None and options.limit < 1):
        raise SwiftSVDError("need --batch-size >= 1, --seqlen >= 2 and --limit >= 1")
    if options.output is not None and options.output.exists() and not options.force:
        raise SwiftSVDError(f"{options.output} exists: pass --force to replace it or choose another --output")


def _location(loaded: Any) -> Path | None:
    """The local directory (or file) a target was loaded from, for checkpoint bytes; None for hub ids.

    `name_or_path` is where from_pretrained read the weights (the converted folder for `demo`).
    """
    for candidate in (getattr(loaded.model, "name_or_path", ""), loaded.spec, loaded.model_id):
        path = Path(str(candidate)).expanduser()
        if str(candidate) and path.exists():
            return path
    return None


def _window_limit(limit: int | None, cap: int | None) -> int | None:
    """`--limit` and a recipe's own window cap (GPTQ's C4 keeps 256 windows): the smaller one wins."""
    if cap is None:
        return limit
    return cap if limit is None else min(limit, cap)


def _tuned_on(loaded: Any) -> dict[str, dict[str, Any]]:
    """The texts a swiftsvd checkpoint was tuned on, role -> {id, sha256}; empty for any other model.

    Read from its compressed-model section (factored or merged), which carries the calibration settings and
    the plan's validation record: the WORK that made it may be long gone.
    """
    section = loaded.compressed or {}
    calibration, validation = section.get("calibration") or {}, section.get("validation") or {}
    texts = {
        "calibration": {"id": calibration.get("data_id"), "sha256": calibration.get("data_sha256")},
        "validation": {"id": validation.get("data_id"), "sha256": validation.get("text_sha256")},
    }
    return {role: text for role, text in texts.items() if text["sha256"]}


def _release_memory() -> None:
    """Return a freed model's memory before the next target loads (both may not fit at once).

    `malloc_trim` hands glibc's freed heap back to the OS, so the next target's CPU RSS baseline is not
    lowered by pages the previous one left behind.
    """
    import ctypes
    import ctypes.util

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _evaluate_target(
    spec: str, options: EvalOptions, device: str, texts: dict[str, Any], prepared: Any
) -> TargetReport:
    """Load one target, measure everything the options ask for, and free it (also on errors)."""
    from swiftsvd_cli.metrics.speed import current_rss
    from swiftsvd_cli.model.loading import load_model

    start, rss_baseline = time.perf_counter(), current_rss()
    loaded = load_model(spec, dtype=options.dtype, device=device, trust_remote_code=options.trust_remote_code)
    try:
        report = _measure(loaded, options, texts, prepared, rss_baseline)
    finally:
        del loaded  # the last reference: the caller never sees the model
        _release_memory()
    return replace(report, seconds=time.perf_counter() - start)


def _measure(loaded: Any, options: EvalOptions, texts: dict[str, Any], prepared: Any, rss: int) -> TargetReport:
    from swiftsvd_cli.data.text import tokenize
    from swiftsvd_cli.log import progress
    from swiftsvd_cli.metrics.perplexity import perplexity
    from swiftsvd_cli.metrics.speed import measure_size, measure_speed
    from swiftsvd_cli.metrics.zeroshot import run_zero_shot

    model, spec = loaded.model, loaded.spec
    size = measure_size(model, _location(loaded))
    perplexities: dict[str, dict[str, Any]] = {}
    for name, source in texts.items():
        ids = tokenize(loaded.tokenizer, source.text)
        total = ids.numel() // options.seqlen
        limit = _window_limit(options.limit, source.windows)
        with progress() as bar:
            task = bar.add_task(f"{spec}: {name}", total=min(limit or total, total))
            result = perplexity(
                model,
                ids,
                seqlen=options.seqlen,
                limit=limit,
                batch_size=options.batch_size,
                on_windows=functools.partial(bar.advance, task),
            )
        perplexities[name] = {"dataset_id": source.id, "text_sha256": source.sha256, **asdict(result)}
        logger.info("%s: %s perplexity %.4f (%d windows)", spec, name, result.ppl, result.windows)
        roles = [role for role, text in _tuned_on(loaded).items() if text["sha256"] == source.sha256]
        if roles:
            perplexities[name]["tuned_on"] = roles
            logger.warning(
                "%s was tuned on %s itself (%s text): its %s perplexity is not held-out",
                spec,
                name,
                " and ".join(roles),
                name,
            )
    zero_shot = (
        run_zero_shot(model, loaded.tokenizer, prepared, batch_size=options.batch_size, limit=options.zeroshot_limit)
        if prepared.runnable
        else {}
    )
    speed = (
        measure_speed(
            model,
            prompt_len=options.bench_prompt_len,
            new_tokens=options.bench_new_tokens,
            batch_size=options.bench_batch_size,
            repeats=options.bench_repeats,
            rss_baseline=rss,
        )
        if options.bench
        else None
    )
    return TargetReport(
        target=spec,
        model_id=loaded.model_id,
        revision=loaded.revision,
        fingerprint=loaded.fingerprint,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        compressed=loaded.compressed,
        perplexity=perplexities,
        zero_shot=zero_shot,
        size={**asdict(size), "target_kept_ratio": size.target_kept_ratio},
        speed=None if speed is None else asdict(speed),
    )


def evaluate(options: EvalOptions) -> EvalReport:
    """Evaluate every target on every task (and benchmark it if asked); write the JSON report if asked."""
    from swiftsvd_cli.data.text import load_text
    from swiftsvd_cli.metrics.zeroshot import prepare_tasks
    from swiftsvd_cli.model.loading import resolve_device

    _check_options(options)
    ppl_names, zs_names = classify_tasks(split_tasks(options.tasks), options.task_include_path)
    device = resolve_device(options.device)
    texts = {name: load_text(name, "test") for name in ppl_names}  # offline hub datasets fail here, before any model
    prepared = prepare_tasks(zs_names, options.task_include_path)

    targets = [_evaluate_target(spec, options, device, texts, prepared) for spec in options.targets]
    protocol: dict[str, Any] = {
        "perplexity": {
            "datasets": {name: {"id": s.id, "sha256": s.sha256, **s.protocol} for name, s in texts.items()},
            "seqlen": options.seqlen,
            "limit": options.limit,
            "windows": "non-overlapping, ragged tail dropped, seqlen-1 predictions each",
            "tokenization": "tokenizer(whole text, return_tensors='pt'): its own special tokens, once",
            "ppl": "exp(mean NLL over all predicted tokens), NLL summed in float64",
        },
        "zero_shot": {"tasks": zs_names, "num_fewshot": 0, "limit": options.zeroshot_limit},
        "bench": {
            **{key: getattr(options, f"bench_{key}") for key in ("prompt_len", "new_tokens", "batch_size", "repeats")},
            "kv_cache_bytes_per_token": "bytes the cache holds after a prefill / (batch_size x prompt_len)",
            "decoding": "greedy, min_new_tokens = new_tokens",
        }
        if options.bench
        else None,
        "batch_size": options.batch_size,
        "dtype": str(options.dtype),
        "device": device,
    }
    inputs = {f"target {t.target}": t.fingerprint for t in targets}
    inputs |= {f"text {name}": source.sha256 for name, source in texts.items()}
    report = EvalReport(
        protocol=protocol, targets=targets, zero_shot_skipped=prepared.skipped, provenance=make_provenance(**inputs)
    )
    _warn_incomparable(report)
    if options.output is not None:
        report.save(options.output)
        logger.info("Wrote %s", options.output)
    return report


def _warn_incomparable(report: EvalReport) -> None:
    """Different tokenizers give different token counts: their perplexities are not comparable."""
    if not report.targets:
        return
    first = report.targets[0]
    for other in report.targets[1:]:
        for name, result in other.perplexity.items():
            base = first.perplexity.get(name)
            if base is not None and base["text_tokens"] != result["text_tokens"]:
                logger.warning(
                    f"{first.target} and {other.target} tokenize {name} differently ({base['text_tokens']} "
                    f"vs {result['text_tokens']} tokens): their perplexities are not comparable"
                )
