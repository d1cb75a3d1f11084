"""Text sources for calibration, α validation and perplexity, built exactly as the field's released code builds them.

Every name has three splits with three jobs: `train` (calibration), `validation` (scoring the α grid of the
dynamic strategy) and `test` (what `eval` reports). They never overlap, so nothing tuned sees evaluation text.

- `wikitext2`, `ptb`: the datasets' train / validation / test splits; test as SVD-LLM's `get_test_data`.
- `c4`: train = shard 00000's first 20,000 documents; validation = validation shard 00001's first 2,000
  (a shard no evaluation recipe reads); test = validation shard 00000's first 2,000 documents, every full
  window (SVD-LLM's `get_test_data`, the Swift-SVD paper's C4 numbers).
- `c4-gptq`: as `c4`, but test = validation shard 00000's first 1,100 documents joined by " ", first 256
  windows (GPTQ's `--new-eval` `get_c4_new`; its older `get_c4` samples 256 random windows instead).
- `demo`: Brown files; test = `sorted(files)[::25]`, validation = `sorted(files)[12::25]`, train = the rest.

WikiText-2, PTB and C4 documents are joined with a blank line, as SVD-LLM does (`"\\n\\n".join`). A local
`.txt` / `.jsonl` (a `text` field per line) file has no splits: the same file serves all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from swiftsvd_cli.config import Sampler, choice
from swiftsvd_cli.errors import SwiftSVDError

logger = logging.getLogger("swiftsvd")

Split = Literal["train", "validation", "test"]
TEXT_SUFFIXES = (".txt", ".jsonl")  # local text files: plain text, or one {"text": ...} object per line


@dataclass(frozen=True)
class Recipe:
    """How one split of a hub dataset becomes one text: which rows, which field, which joiner, how many windows."""

    dataset: str  # Hugging Face dataset path
    config: str | None
    split: str  # the dataset's own split name
    field: str
    joiner: str
    data_files: str | None = None  # one shard of a sharded dataset (C4)
    documents: int | None = None  # only the first N rows (None: all)
    windows: int | None = None  # only the first N perplexity windows (None: every full window)
    revision: str | None = None  # None: the dataset's default branch (the text's SHA-256 pins the content)
    reference: str = ""  # whose released code builds it this way

    def protocol(self) -> dict[str, Any]:
        """What an eval report or plan records about this text besides its hash."""
        return asdict(self) | {"revision": self.revision or "default branch (not pinned)"}


_WIKITEXT = Recipe("wikitext", "wikitext-2-raw-v1", "train", "text", "\n\n", reference="SVD-LLM get_calib_train_data")
_PTB = Recipe("ptb_text_only", "penn_treebank", "train", "sentence", "\n\n", reference="SVD-LLM get_calib_train_data")
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
C4_EVAL_SHARD = "en/c4-validation.00000-of-00008.json.gz"  # SVD-LLM's and GPTQ's (SparseGPT's) C4 test text
C4_VALIDATION_SHARD = "en/c4-validation.00001-of-00008.json.gz"  # read by no evaluation recipe
_C4_TRAIN = Recipe(
    "allenai/c4",
    None,
    "train",
    "text",
    "\n\n",
    data_files=C4_TRAIN_SHARD,
    documents=20_000,
    reference="SVD-LLM get_calib_train_data joins its whole C4 train file; we take the shard's first 20,000 documents",
)
_C4_VALIDATION = replace(
    _C4_TRAIN,
    split="validation",
    data_files=C4_VALIDATION_SHARD,
    documents=2_000,
    reference="swiftsvd: a C4 validation shard that no evaluation recipe reads",
)
_C4_TEST = replace(
    _C4_VALIDATION,
    data_files=C4_EVAL_SHARD,
    reference="SVD-LLM get_test_data (the Swift-SVD paper's C4 numbers)",
)

RECIPES: dict[str, dict[Split, Recipe]] = {
    "wikitext2": {
        "train": _WIKITEXT,
        "validation": replace(_WIKITEXT, split="validation", reference="WikiText-2's validation split"),
        "test": replace(_WIKITEXT, split="test", reference="SVD-LLM get_test_data"),
    },
    "ptb": {
        "train": _PTB,
        "validation": replace(_PTB, split="validation", reference="PTB's validation split"),
        "test": replace(_PTB, split="test", reference="SVD-LLM get_test_data"),
    },
    "c4": {"train": _C4_TRAIN, "validation": _C4_VALIDATION, "test": _C4_TEST},
    "c4-gptq": {
        "train": _C4_TRAIN,
        "validation": _C4_VALIDATION,
        "test": replace(
            _C4_TEST,
            joiner=" ",
            documents=1_100,
            windows=256,
            reference="GPTQ datautils get_c4_new (--new-eval): first 1,100 documents, first 256 windows",
        ),
    },
}
PERPLEXITY_DATASETS = (*RECIPES, "demo")
DEMO_SPLITS: dict[Split, Literal["calibration", "validation", "evaluation"]] = {
    "train": "calibration",
    "validation": "validation",
    "test": "evaluation",
}


@dataclass(frozen=True)
class TextSource:
    """A joined text, an id precise enough to reproduce it, and how it was built (for reports and plans)."""

    id: str
    text: str
    protocol: dict[str, Any] = field(default_factory=dict)
    windows: int | None = None  # the recipe's cap on perplexity windows (None: every full window)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def hub_text(recipe: Recipe) -> str:
    """The recipe's rows joined into one text (loaded with `datasets.load_dataset`)."""
    from datasets import load_dataset

    data_files = {recipe.split: recipe.data_files} if recipe.data_files else None
    try:
        rows = load_dataset(
            recipe.dataset, recipe.config, split=recipe.split, data_files=data_files, revision=recipe.revision
        )
    except Exception as error:  # datasets raises many types for "offline" / "not found"
        raise SwiftSVDError(
            f"cannot load '{recipe.dataset}' ({recipe.split}) from the Hugging Face hub ({type(error).__name__}): "
            "use --data demo or a local .txt/.jsonl file when offline"
        ) from error
    if recipe.documents is not None:
        rows = rows.select(range(min(recipe.documents, len(rows))))
    return recipe.joiner.join(rows[recipe.field])


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise SwiftSVDError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        texts: list[str] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise SwiftSVDError(f"{path}:{number}: expected a JSON object with a 'text' field") from error
        text = "\n\n".join(texts)
    else:
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SwiftSVDError(f"text file is empty: {path}")
    return text


def is_local_file(name: str) -> bool:
    """A `--data` / `--val-data` / task name that means a local text file rather than a named dataset."""
    return name not in PERPLEXITY_DATASETS and Path(name).suffix in TEXT_SUFFIXES


def load_text(name: str, split: Split) -> TextSource:
    """One split of a named dataset (see the module table), or a local file (the same file for every split)."""
    if name == "demo":
        from swiftsvd_cli.data.demo import DEMO_TEXT_ID, demo_text

        part = DEMO_SPLITS[split]
        return TextSource(
            id=f"{DEMO_TEXT_ID}:{split}", text=demo_text(part), protocol={"dataset": DEMO_TEXT_ID, "split": part}
        )
    if name in RECIPES:
        recipe = RECIPES[name][split]
        return TextSource(
            id=f"{name}:{split}", text=hub_text(recipe), protocol=recipe.protocol(), windows=recipe.windows
        )
    path = Path(name).expanduser()
    if path.suffix not in TEXT_SUFFIXES:
        valid = ", ".join(PERPLEXITY_DATASETS)
        raise SwiftSVDError(f"unknown data '{name}': use one of {valid} or a .txt/.jsonl file")
    text = _file_text(path)
    return TextSource(id=f"file:{path.resolve()}", text=text, protocol={"file": str(path.resolve()), "split": "whole"})


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The field's tokenisation: the whole text at once, as SVD-LLM / Swift-SVD do; 1-D int64 ids.

    `tokenizer(text)` prepends one BOS for Llama-style tokenizers to the whole text, not one per window.
    `verbose=False` silences the "longer than model max length" warning: the caller cuts windows itself.
    """
    ids: torch.Tensor = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids.to(torch.long)


def spread_windows(ids: torch.Tensor, seqlen: int, count: int) -> torch.Tensor:
    """`count` of the text's non-overlapping `seqlen` windows, evenly spaced from the first to the last, (k, seqlen).

    Scoring α on the first windows alone would read the first article or two (WikiText-2) or the first
    genre (Brown); spacing them covers the whole validation text at the same cost.
    """
    total = ids.numel() // seqlen
    if total == 0 or count < 1:
        raise SwiftSVDError(f"the validation text has {ids.numel():,} tokens: need at least one window of {seqlen}")
    windows = ids[: total * seqlen].view(total, seqlen)
    return windows[torch.linspace(0, total - 1, min(count, total)).round().long()]


def _check_window_request(samples: int, seqlen: int) -> None:
    if samples < 1 or seqlen < 2:
        raise SwiftSVDError(f"need --samples >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Seeded token windows: `samples` windows of `seqlen` tokens at random positions of the tokenised text.

    Positions come from a torch generator seeded with `seed`; windows may overlap. This is our sampler, not
    SVD-LLM's (see `svd_llm_windows`), though the number of windows and tokens is the field's.
    """
    _check_window_request(samples, seqlen)
    if ids.numel() < samples * seqlen:
        raise SwiftSVDError(
            f"the text has {ids.numel():,} tokens, fewer than --samples x --seqlen = {samples * seqlen:,}: "
            "use more text or fewer/shorter samples"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])


def svd_llm_windows(tokenizer: Any, text: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """SVD-LLM's calibration sampler (`get_calib_train_data`, batch size 1), draw for draw.

    `random.seed(seed)`, then `samples + 1` draws: a *character* offset `i = randint(0, len(text) − seqlen − 1)`,
    the slice `text[i : i + 10·seqlen]` tokenised on its own (so each window starts with the tokenizer's BOS,
    where it adds one, and usually mid-word), its first `seqlen` tokens kept; a slice with fewer tokens is
    skipped. Their loop appends a window only when the next one is drawn, so the last kept window is never
    used: that is why it draws one more than asked, and why a skipped draw leaves one window fewer.
    """
    _check_window_request(samples, seqlen)
    if len(text) < seqlen + 2:
        raise SwiftSVDError(f"the text has {len(text):,} characters, too few for --seqlen {seqlen}")
    rng = random.Random(seed)  # the same Mersenne Twister stream as their module-level random.seed(seed)
    kept: list[torch.Tensor] = []
    for _ in range(samples + 1):
        start = rng.randint(0, len(text) - seqlen - 1)
        ids = tokenize(tokenizer, text[start : start + seqlen * 10])
        if ids.numel() >= seqlen:
            kept.append(ids[:seqlen])
    windows = kept[:-1]
    if not windows:
        raise SwiftSVDError(f"SVD-LLM's sampler found no slice of {seqlen} tokens: use more text or a smaller --seqlen")
    if len(windows) < samples:
        logger.warning(
            "SVD-LLM's sampler kept %d of %d windows (short slices are skipped, as in its code)", len(windows), samples
        )
    return torch.stack(windows)


def sample_windows(sampler: str, tokenizer: Any, text: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration windows (samples, seqlen) of `text` by the named `Sampler`."""
    if choice(Sampler, sampler) == Sampler.SVD_LLM:
        return svd_llm_windows(tokenizer, text, samples, seqlen, seed)
    return calibration_windows(tokenize(tokenizer, text), samples, seqlen, seed)
