"""Streamed weights: the layer-at-a-time path gives what loading the whole model gives, and never holds the model."""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import EigenIndex
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.data.text import load_text, tokenize
from swiftsvd_cli.engine.covariance import LayerStats
from swiftsvd_cli.engine.eigen import open_matching_model
from swiftsvd_cli.engine.factors import FactorSource, RankMap, wanted_ranks
from swiftsvd_cli.engine.scoring import candidate_perplexities
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.perplexity import perplexity
from swiftsvd_cli.metrics.speed import checkpoint_bytes
from swiftsvd_cli.model import checkpoint, loading, streaming
from swiftsvd_cli.model.architectures import LLAMA, ArchSpec, decoder_layers, target_linears
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.model.streaming import open_model
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import build_tiny_model

SAMPLES, SEQLEN = 8, 32


def pipeline(model_dir: Path, text: Path, root: Path, **calibrate: object) -> tuple[Path, Path, Path]:
    """calibrate -> dynamic plan (α searched) -> factored checkpoint; (WORK, plan, compressed dir)."""
    source = ModelSource(str(model_dir), device="cpu")
    work = root / "work"
    run_calibrate(
        CalibrateOptions(source=source, work=work, data=str(text), samples=SAMPLES, seqlen=SEQLEN, **calibrate)  # type: ignore[arg-type]
    )
    plan = run_allocate(AllocateOptions(work=work, ratio=0.6, device="cpu", val_samples=2)).path
    out = root / "compressed"
    run_compress(CompressOptions(source=source, out=out, plan=plan))
    return work, plan, out


def shard_tensors(work: Path, folder: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((work / folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors |= {f"{path.name}:{key}": handle.get_tensor(key) for key in handle.keys()}
    return tensors


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


@contextmanager
def reconstructed(model: torch.nn.Module, spec: ArchSpec, ranks: RankMap, factors_of: FactorSource) -> Iterator[None]:
    """The whole-model reference: each factored weight temporarily replaced by its dense reconstruction A B."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its original values)
    try:
        for index, layer in enumerate(decoder_layers(model, spec)):
            linears = target_linears(layer, spec)
            wanted = wanted_ranks(ranks, index, linears)
            for name, (A, B) in factors_of(index, {name: linears[name].weight for name in wanted}, wanted).items():
                weight = linears[name].weight
                saved.append((weight, weight.detach().clone()))
                with torch.no_grad():
                    weight.copy_((A @ B).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def test_streamed_path_equals_full_load_path(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same Grams, eigenbases, plan and compressed logits whether tensors stream from safetensors one layer at a
    time or come from the whole model loaded once (the fallback GGUF files and .bin checkpoints take)."""
    streamed = pipeline(tiny_llama_dir, tiny_text_file, tmp_path / "streamed")
    monkeypatch.setattr(streaming, "safetensors_files", lambda directory: [])  # as if the checkpoint had none
    assert isinstance(open_model(str(tiny_llama_dir)).weights, streaming.StateDictSource)
    whole = pipeline(tiny_llama_dir, tiny_text_file, tmp_path / "whole")
    for folder in ("covariance", "eigen"):
        a, b = shard_tensors(streamed[0], folder), shard_tensors(whole[0], folder)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    plans = [json.loads(path.read_text()) for path in (streamed[1], whole[1])]
    for plan in plans:
        plan.pop("provenance"), plan.pop("work"), plan.pop("options")
    assert plans[0] == plans[1]
    assert plans[0]["alpha"] is not None and len(plans[0]["candidates"]) == 11
    torch.testing.assert_close(logits(load_compressed(streamed[2])[0]), logits(load_compressed(whole[2])[0]))


def test_layerwise_scoring_equals_full_model_perplexity(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """The α search's layer-at-a-time perplexity equals a plain full-model forward with the weights reconstructed."""
    work = tmp_path / "work"
    run_calibrate(
        CalibrateOptions(ModelSource(str(tiny_llama_dir), device="cpu"), work, str(tiny_text_file), SAMPLES, SEQLEN)
    )
    plan = RankPlan.load(run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu")).path)
    manifest = CalibrationManifest.load(work)
    ranks = {(p.layer, p.module): p.rank for p in plan.modules}
    streamed = open_matching_model(work, manifest, None, "cpu")
    ids = tokenize(streamed.tokenizer, load_text(str(tiny_text_file), "train").text)
    factors = FactorSource("swift", work, manifest, EigenIndex.load(work), LLAMA, "cpu")
    scored = candidate_perplexities(
        streamed, LLAMA, ids, seqlen=SEQLEN, limit=5, plans=[ranks, {}], factors=factors, device="cpu", batch_size=2
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    original = perplexity(model, ids, seqlen=SEQLEN, limit=5, batch_size=2).ppl
    with reconstructed(model, LLAMA, ranks, factors):
        expected = perplexity(model, ids, seqlen=SEQLEN, limit=5, batch_size=2).ppl
    assert scored[0].ppl == pytest.approx(expected, rel=1e-6)
    assert scored[1].ppl == pytest.approx(original, rel=1e-6)
    assert scored[0].ppl != pytest.approx(original, rel=1e-3)  # the plan really changed the model


def test_calibration_holds_one_decoder_layer_at_a_time(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage materialises at most one decoder layer of the skeleton at once (plus embeddings or head)."""
    real = streaming.StreamedModel.materialize
    seen: list[int] = []

    def counting(self: streaming.StreamedModel, path: str, device: torch.device | str) -> torch.nn.Module:
        module = real(self, path, device)
        layers = self.skeleton.get_submodule(LLAMA.layers)
        seen.append(sum(not next(layer.parameters()).is_meta for layer in layers))
        return module

    monkeypatch.setattr(streaming.StreamedModel, "materialize", counting)
    pipeline(tiny_llama_dir, tiny_text_file, tmp_path)
    assert seen and max(seen) == 1


def mapped(files: set[Path]) -> set[Path]:
    """Those of `files` memory-mapped into this process (Linux)."""
    fields = [line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines()]
    return files & {Path(parts[5]) for parts in fields if len(parts) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_checkpoint_pages_leave_the_process_with_their_tensors(tiny_llama_dir: Path) -> None:
    """No checkpoint file stays mapped once its tensors are copied out: a map kept open for the run kept every
    page it served in this process's RSS, so a layer-by-layer stage grew by one layer per layer (issue 13)."""
    files = {path.resolve() for path in tiny_llama_dir.glob("*.safetensors")}
    streamed = open_model(str(tiny_llama_dir))  # the fingerprint has read rows of every tensor
    assert not mapped(files)
    with streamed.loaded(f"{LLAMA.layers}.0", "cpu"):
        assert not mapped(files)  # the layer holds copies, not views of the map
    view = streamed.tensor(f"{LLAMA.layers}.0.mlp.up_proj.weight")
    assert mapped(files)  # a view keeps its map...
    del view
    assert not mapped(files)  # ...and only as long as it lives


def test_calibration_frees_a_layers_grams_before_the_next_layer(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a layer runs, the float64 Grams of the one before are gone (the writer holds only their packed
    copy): held over, they doubled the Grams in RAM (0.54 GB per Llama-2-7B layer)."""
    grams: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    remove, materialize = LayerStats.remove, streaming.StreamedModel.materialize

    def tracked(self: LayerStats) -> dict[str, torch.Tensor]:
        sums = remove(self)
        grams.extend(weakref.ref(value) for name, value in sums.items() if name.endswith("gram"))
        return sums

    def counting(self: streaming.StreamedModel, path: str, device: torch.device | str) -> torch.nn.Module:
        alive.append(sum(ref() is not None for ref in grams))
        return materialize(self, path, device)

    monkeypatch.setattr(LayerStats, "remove", tracked)
    monkeypatch.setattr(streaming.StreamedModel, "materialize", counting)
    run_calibrate(
        CalibrateOptions(ModelSource(str(tiny_llama_dir), device="cpu"), tmp_path, str(tiny_text_file), 4, 16)
    )
    assert grams and len(alive) > 2 and max(alive) == 0


def test_offloaded_hidden_states_give_the_same_grams(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    for offload in ("memory", "disk"):
        run_calibrate(
            CalibrateOptions(
                ModelSource(str(tiny_llama_dir), device="cpu"),
                tmp_path / offload,
                str(tiny_text_file),
                SAMPLES,
                SEQLEN,
                batch_size=3,
                offload_hidden=offload,  # type: ignore[arg-type]
            )
        )
    a, b = shard_tensors(tmp_path / "memory", "covariance"), shard_tensors(tmp_path / "disk", "covariance")
    assert all(torch.equal(a[key], b[key]) for key in a) and a.keys() == b.keys()
    assert not list((tmp_path / "disk").glob(".hidden*"))  # the memory-mapped file is removed


def test_bfloat16_checkpoint_stays_bfloat16_and_shrinks(
    tiny_tokenizer: object, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 model compressed on the CPU (computed in float32) is written in bfloat16, in several shards, and
    is smaller than the original; plain transformers and load_compressed read it back."""
    original = tmp_path / "bf16"
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer)).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(original)
    tiny_tokenizer.save_pretrained(original)  # type: ignore[attr-defined]
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 40_000)  # several shards even for a tiny model
    _, plan, out = pipeline(original, tiny_text_file, tmp_path)
    files = sorted(path.name for path in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    dtypes = set()
    for name in files:
        with safe_open(str(out / name), framework="pt") as handle:
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"BF16"}
    assert checkpoint_bytes(out) < checkpoint_bytes(original)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    factored, _ = load_compressed(out, dtype="bfloat16")
    assert next(factored.parameters()).dtype == torch.bfloat16
    merged = tmp_path / "merged"
    run_compress(CompressOptions(ModelSource(str(original), device="cpu"), out=merged, plan=plan, merge=True))
    dense = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    torch.testing.assert_close(logits(factored).float(), logits(dense).float(), rtol=0.05, atol=0.05)


def test_tied_embeddings_stream_and_reload(tiny_tokenizer: object, tiny_text_file: Path, tmp_path: Path) -> None:
    """A model with tied input/output embeddings (like the demo) keeps one copy and reloads with the tie."""
    from transformers import LlamaConfig

    from tests.conftest import TINY_SHAPE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), max_position_embeddings=256, tie_word_embeddings=True, **TINY_SHAPE
    )  # type: ignore[arg-type]
    tied = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    tiny_tokenizer.save_pretrained(tied)  # type: ignore[attr-defined]
    assert isinstance(open_model(str(tied)).weights, streaming.SafetensorsSource)  # streamed, not loaded whole
    _, _, out = pipeline(tied, tiny_text_file, tmp_path)
    model, _ = load_compressed(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()


def test_hub_id_resolves_to_the_cached_snapshot(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id streams from the hub cache's snapshot (offline here, so the files are put where the hub puts them)."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--tiny"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    streamed = open_model("fake-org/tiny")
    assert isinstance(streamed.weights, streaming.SafetensorsSource)
    assert streamed.location == repo / "snapshots" / commit
    assert streamed.fingerprint == open_model(str(tiny_llama_dir)).fingerprint
    with pytest.raises(SwiftSVDError, match="hub"):
        open_model("fake-org/absent")


def test_streamed_and_whole_fingerprints_agree(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """One identity for one checkpoint, whether streamed (calibrate) or loaded whole (eval), float32 or bfloat16,
    wherever its directory is (a WORK stays usable after the model moves)."""
    streamed = open_model(str(tiny_llama_dir))
    assert streamed.fingerprint == loading.load_model(str(tiny_llama_dir)).fingerprint
    assert streamed.fingerprint == open_model(str(tiny_llama_dir), dtype="bfloat16").fingerprint
    moved = shutil.copytree(tiny_llama_dir, tmp_path / "moved")
    assert open_model(str(moved)).fingerprint == streamed.fingerprint


def test_svd_llm_needs_input_grams(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from swiftsvd_cli.cli import app

    source = ModelSource(str(tiny_llama_dir), device="cpu")
    work = tmp_path / "work"
    run_calibrate(CalibrateOptions(source, work, str(tiny_text_file), SAMPLES, SEQLEN))
    result = CliRunner().invoke(app, ["allocate", str(work), "--ratio", "0.5", "--method", "svd-llm"])
    assert result.exit_code == 1 and "--keep-input-grams" in result.output and "Traceback" not in result.output
    assert not (work / "eigen").exists()  # refused before any work
    kept = tmp_path / "kept"
    run_calibrate(CalibrateOptions(source, kept, str(tiny_text_file), SAMPLES, SEQLEN, keep_input_grams=True))
    assert set(CalibrationManifest.load(kept).grams.values()) == {"input"}
    plan = run_allocate(AllocateOptions(work=kept, ratio=0.5, method="svd-llm", device="cpu", val_samples=1))
    run_compress(CompressOptions(source, out=tmp_path / "c", plan=plan.path, method="svd-llm"))
    assert store.sha256_file(tmp_path / "c" / "model.safetensors")
