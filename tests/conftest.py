"""Shared fixtures: tiny random Llama/Qwen2 models with a tokenizer trained here, saved to a temp dir.

Nothing is downloaded: the tokenizer is a small BPE trained on `TINY_TEXT`, the models are random.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. Actions speak louder than words. "
    "Better late than never. Every cloud has a silver lining. "
    "Fortune favours the bold. Knowledge is power. Practice makes perfect. "
    "The early bird catches the worm. When in Rome, do as the Romans do. "
) * 40


def train_tokenizer(text: str, vocab_size: int = 300):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on `text`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 200] for i in range(0, len(text), 200)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TINY_SHAPE: dict[str, int] = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
"""Every tiny test model's shape: 2 layers, GQA (4 query heads, 2 KV heads)."""


def build_tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A 2-layer random model of `family` (a `model_type` in ARCHITECTURES), with GQA (4 heads, 2 KV heads);
    `overrides` change any config field (e.g. num_hidden_layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=False, **TINY_SHAPE)
    config = AutoConfig.for_model(family, **(common | overrides))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():  # -> PreTrainedTokenizerFast
    return train_tokenizer(TINY_TEXT)


def save_tiny_model(family: str, path: Path, tokenizer) -> Path:  # noqa: ANN001
    model = build_tiny_model(family, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:  # noqa: ANN001
    """A saved tiny model directory, once per family."""
    return save_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:  # noqa: ANN001
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text corpus file for `--data PATH`."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:  # noqa: ANN001
    """A tiny Llama trained briefly on TINY_TEXT, so perplexity means something (random models sit at ~vocab)."""
    torch.manual_seed(0)
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    ids = tiny_tokenizer(TINY_TEXT, return_tensors="pt").input_ids[0]
    windows = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = windows[torch.randint(0, windows.shape[0], (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("trained-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def calibrated_plan(model_dir: Path, text: Path, work: Path, samples: int, seqlen: int, ratio: float) -> Path:
    """Calibrate `model_dir` on `text` into `work` and write a uniform plan for `ratio`: its path."""
    from swiftsvd_cli.model.loading import ModelSource
    from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
    from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate

    source = ModelSource(str(model_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=work, data=str(text), samples=samples, seqlen=seqlen))
    return run_allocate(AllocateOptions(work=work, ratio=ratio, strategy="uniform", device="cpu")).path


def linear_inputs(model_dir: Path, text: Path, samples: int, seqlen: int) -> dict[str, torch.Tensor]:
    """Full module name -> the (tokens, n) float64 inputs of every linear over the calibration windows (seed 3),
    from one plain forward of the whole model: an independent reference for everything computed from Grams."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftsvd_cli.data.text import calibration_windows, load_text, tokenize

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), load_text(str(text), "train").text)
    captured: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(
                lambda _m, args, key=name: captured.setdefault(key, []).append(
                    args[0].reshape(-1, args[0].shape[-1]).double()
                )
            )
    with torch.no_grad():
        model(calibration_windows(ids, samples, seqlen, 3))
    return {name: torch.cat(parts) for name, parts in captured.items()}
