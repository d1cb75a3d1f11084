"""Text sources for calibration and perplexity, and the field's calibration protocol (random token windows).

Names: `wikitext2`, `ptb`, `c4` (Hugging Face hub, the splits SVD-LLM/Swift-SVD report), `demo` (the bundled
Brown Corpus, offline), or a local `.txt` / `.jsonl` (a `text` field per line) file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from swiftsvd_cli.errors import SwiftSVDError

Split = Literal["train", "test"]
PERPLEXITY_DATASETS = ("wikitext2", "ptb", "c4", "demo")
TEXT_SUFFIXES = (".txt", ".jsonl")  # local text files: plain text, or one {"text": ...} object per line
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "test": "en/c4-validation.00000-of-00008.json.gz"}
C4_DOCUMENTS = {"train": 20000, "test": 256}


@dataclass(frozen=True)
class TextSource:
    """A joined text and an id precise enough to reproduce it (dataset, split, content hash)."""

    id: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _hub_text(name: str, split: Split) -> str:
    """The field's joins: WikiText-2 with "\\n\\n", PTB sentences with " ", C4 documents with "\\n\\n"."""
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(rows["sentence"])
        split_name = "train" if split == "train" else "validation"
        rows = load_dataset("allenai/c4", data_files={split_name: C4_FILES[split]}, split=split_name)
        return "\n\n".join(rows.select(range(C4_DOCUMENTS[split]))["text"])
    except Exception as error:  # datasets raises many types for "offline" / "not found"
        raise SwiftSVDError(
            f"cannot load '{name}' from the Hugging Face hub ({type(error).__name__}): "
            "use --data demo or a local .txt/.jsonl file when offline"
        ) from error


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


def load_text(name: str, split: Split) -> TextSource:
    """The text of a named dataset split or a local file (the same file serves both splits)."""
    if name == "demo":
        from swiftsvd_cli.data.demo import DEMO_TEXT_ID, demo_text

        text = demo_text("calibration" if split == "train" else "evaluation")
        return TextSource(id=f"{DEMO_TEXT_ID}:{split}", text=text)
    if name in PERPLEXITY_DATASETS:
        return TextSource(id=f"{name}:{split}", text=_hub_text(name, split))
    path = Path(name).expanduser()
    if path.suffix not in TEXT_SUFFIXES:
        valid = ", ".join(PERPLEXITY_DATASETS)
        raise SwiftSVDError(f"unknown data '{name}': use one of {valid} or a .txt/.jsonl file")
    return TextSource(id=f"file:{path.resolve()}", text=_file_text(path))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The field's tokenisation: the whole text at once, as SVD-LLM / Swift-SVD do; 1-D int64 ids.

    `tokenizer(text)` prepends one BOS for Llama-style tokenizers to the whole text, not one per window.
    `verbose=False` silences the "longer than model max length" warning: the caller cuts windows itself.
    """
    ids: torch.Tensor = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids.to(torch.long)


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens (SVD-LLM's protocol), reproducible from `seed`."""
    if samples < 1 or seqlen < 2:
        raise SwiftSVDError(f"need --samples >= 1 and --seqlen >= 2 (got {samples}, {seqlen})")
    if ids.numel() < samples * seqlen:
        raise SwiftSVDError(
            f"the text has {ids.numel():,} tokens, fewer than --samples x --seqlen = {samples * seqlen:,}: "
            "use more text or fewer/shorter samples"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([ids[start : start + seqlen] for start in starts.tolist()])
