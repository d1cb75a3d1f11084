"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

lm-eval is an optional extra (`pip install swiftsvd-cli[zeroshot]`). Zero-shot accuracy is a nice-to-have
next to perplexity, so nothing here stops an evaluation: without lm-eval, or when a task's dataset cannot be
loaded (offline machine, gated dataset), the task is logged and recorded as skipped with the reason, and
perplexity runs. A task is loaded once per evaluation (`prepare_tasks`), then run for each target
(`run_zero_shot`), so a dataset that fails is tried once, not once per model.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swiftsvd_cli.artifacts.provenance import distribution_version

logger = logging.getLogger("swiftsvd")

# The task set of the SVD-LLM / Swift-SVD tables, by their lm-eval names.
ZERO_SHOT_TASKS: tuple[str, ...] = (
    "openbookqa",
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "hellaswag",
    "piqa",
    "mathqa",
)
# The papers' short names.
TASK_ALIASES: dict[str, str] = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}


def canonical_task(name: str) -> str:
    """The lm-eval name for a task the user may have spelled the papers' way."""
    return TASK_ALIASES.get(name, name)


def lm_eval_version() -> str | None:
    """The installed lm-eval version, or None when the extra is not installed."""
    return distribution_version("lm_eval")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool = True) -> Any:
    """Cached: indexing lm-eval's built-in tasks takes seconds, and the stage asks more than once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _manager_for(names: list[str], include_path: Path | None) -> Any:
    """A manager of only the `include_path` tasks if that covers `names` (fast), else one with built-ins."""
    if include_path is not None:
        local = _task_manager(str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return _task_manager(str(include_path) if include_path is not None else None)


def known_tasks(names: list[str], include_path: Path | None = None) -> set[str] | None:
    """Which of `names` lm-eval knows (built-ins and `include_path`); None when lm-eval is missing."""
    if lm_eval_version() is None:
        return None
    names = [canonical_task(n) for n in names]
    return {n for n in names if n in _manager_for(names, include_path).all_tasks}


@dataclass
class PreparedTasks:
    """The outcome of loading the requested tasks once: what can run, and why the rest cannot."""

    runnable: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    include_path: Path | None = None
    lm_eval_version: str | None = None
    task_manager: Any = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def prepare_tasks(names: list[str], include_path: Path | None = None) -> PreparedTasks:
    """Load each task (and its dataset) once; record a skip reason for each one that cannot be loaded."""
    names = [canonical_task(n) for n in names]
    version = lm_eval_version()
    if version is None:
        reason = "lm-eval is not installed (pip install 'swiftsvd-cli[zeroshot]')"
        if names:
            logger.warning("Zero-shot tasks %s skipped: %s.", ", ".join(names), reason)
        return PreparedTasks(runnable=[], skipped=dict.fromkeys(names, reason), include_path=include_path)
    if not names:
        return PreparedTasks(runnable=[], include_path=include_path, lm_eval_version=version)

    manager = _manager_for(names, include_path)
    prepared = PreparedTasks(runnable=[], include_path=include_path, lm_eval_version=version, task_manager=manager)
    hub_down: str | None = None
    for name in names:
        if hub_down is not None and name in ZERO_SHOT_TASKS:
            # Each hub dataset retries for ~20 s when offline: one failure is enough to know.
            prepared.skipped[name] = hub_down
            logger.warning("Zero-shot task %s skipped: %s.", name, hub_down)
            continue
        try:
            manager.load([name])  # builds the task, which loads its dataset: where an offline machine fails
        except Exception as exc:  # noqa: BLE001 - any loading failure means "skip with the reason", by design
            reason = f"could not load the task or its dataset ({_first_line(exc)})"
            logger.warning("Zero-shot task %s skipped: %s.", name, reason)
            prepared.skipped[name] = reason
            if isinstance(exc, ConnectionError):
                hub_down = reason
        else:
            prepared.runnable.append(name)
    return prepared


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"acc,none": 0.5, "alias": ...}` as `{"acc": 0.5}` (numbers only, filter suffix dropped)."""
    out: dict[str, float] = {}
    for key, value in task_results.items():
        # Metrics are "name,filter" keys; bare keys ("alias", "sample_len") are bookkeeping.
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return out


def run_zero_shot(
    model: Any,
    tokenizer: Any,
    prepared: PreparedTasks,
    *,
    batch_size: int = 1,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy (and lm-eval's other metrics) per runnable task, zero-shot, for one in-memory model."""
    if not prepared.runnable:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(prepared.runnable),
        num_fewshot=0,
        limit=limit,
        task_manager=prepared.task_manager,
        log_samples=False,
    )
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    per_task: dict[str, dict[str, float]] = {}
    for name, task_results in results["results"].items():
        metrics = _metrics(task_results)
        samples = results.get("n-samples", {}).get(name, {})
        if isinstance(samples, dict) and "effective" in samples:
            metrics["samples"] = float(samples["effective"])
        per_task[name] = metrics
    return per_task
