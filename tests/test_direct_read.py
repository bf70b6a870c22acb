"""Reading safetensors straight into device memory (fastlora_core.loading.direct, decision 29).

On the GPU the engine reads the transformer this way when the card has ample room; here the same
code runs with a CPU device (ordinary staging memory, synchronous copies). Small staging chunks
make tensors straddle chunk boundaries and runs. Every result must be bitwise the file's tensors
and the loaders' results must equal the ordinary (``safe_open`` / ``from_pretrained``) path
exactly: same names, dtypes and values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlora_core.errors import ModelLoadError
from fastlora_core.loading import DIRECT_COMPONENTS, direct, load_pipeline, read_header, write_single_files
from fastlora_core.specs import ModelSource
from fastlora_core.tiny import build_tiny_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file with every kind of tensor a checkpoint may hold, odd sizes included."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 19, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(37, generator=g),
        "b.fp8": torch.randn(11, 13, generator=g).to(torch.float8_e4m3fn),
        "b.half": torch.randn(3, 5, 7, generator=g).half(),
        "c.scalar": torch.tensor(0.25),
        "c.empty": torch.empty(0, 4),
        "c.flag": torch.tensor([True, False, True]),
        "c.index": torch.arange(9, dtype=torch.int64),
        "d.big": torch.randn(40, 257, generator=g),
        "e.double": torch.randn(6, generator=g, dtype=torch.float64),
    }
    path = tmp_path_factory.mktemp("direct") / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"note": "test"})
    return path


@pytest.mark.parametrize("chunk", [7, 4096, direct.CHUNK_BYTES])
@pytest.mark.parametrize("threads", [1, 3])
def test_every_tensor_is_bitwise_the_file(mixed: Path, chunk: int, threads: int) -> None:
    want = load_file(str(mixed))
    got = direct.read_tensors(read_header(mixed), want, CPU, chunk_bytes=chunk, threads=threads)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


def test_the_next_chunk_is_read_while_this_one_is_copied(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 53: a chunk's copies wait for the reading thread's GIL beside a busy loader; the reads
    of the next chunk must already be under way then. Each copy here waits (2 s at most) for the next
    chunk's first read to begin; a reader that started it only after the copy would time out."""
    import threading

    header = read_header(mixed)
    chunk = 512
    starts = [header.data_start + pos for a, b, _ in direct._runs(header, sorted(header.tensors, key=lambda k: header.tensors[k].offsets))
              for pos in range(a, b, chunk)]  # (mixed.safetensors has no gaps: one run)
    began = {offset: threading.Event() for offset in starts}
    read_exactly = direct.read_exactly

    def recording_read(path: Any, fd: int, view: Any, offset: int) -> None:
        if offset in began:
            began[offset].set()
        read_exactly(path, fd, view, offset)

    copies, late = [], []
    foreach_copy = torch._foreach_copy_

    def waiting_copy(dst: Any, src: Any, **kwargs: Any) -> None:
        i = len(copies)
        copies.append(i)
        if i + 1 < len(starts) and not late and not began[starts[i + 1]].wait(2.0):
            late.append(i)
        foreach_copy(dst, src, **kwargs)

    monkeypatch.setattr(direct, "read_exactly", recording_read)
    monkeypatch.setattr(torch, "_foreach_copy_", waiting_copy)
    got = direct.read_tensors(header, header.tensors, CPU, chunk_bytes=chunk, threads=1)
    assert len(copies) == len(starts) >= 4 and late == []
    want = load_file(str(mixed))
    assert all(torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)) for k, w in want.items())


def test_a_subset_with_gaps_reads_only_what_is_asked(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors left out are not read; with no read-through allowance every gap starts a new run."""
    monkeypatch.setattr(direct, "GAP_BYTES", 0)
    want = load_file(str(mixed))
    names = ["c.flag", "a.weight", "d.big"]
    header = read_header(mixed)
    assert len(direct._runs(header, sorted(names, key=lambda k: header.tensors[k].offsets))) >= 2
    got = direct.read_tensors(header, names, CPU, chunk_bytes=100)
    assert sorted(got) == sorted(names)
    assert all(torch.equal(got[k], want[k]) for k in names)


def test_each_tensor_is_its_own_allocation(mixed: Path) -> None:
    """Replacing one layer (by its quantised version) must free that layer's memory alone."""
    got = direct.read_tensors(read_header(mixed), ["a.weight", "a.bias", "d.big"], CPU)
    storages = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(storages) == 3
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in got.values())


def test_a_file_shortened_after_its_header_was_checked(mixed: Path, tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(mixed.read_bytes())
    header = read_header(path)
    path.write_bytes(mixed.read_bytes()[:-500])
    with pytest.raises(ModelLoadError, match="short.safetensors.*could not be read.*download the file again"):
        direct.read_tensors(header, header.tensors, CPU, chunk_bytes=256)


# ---------------------------------------------------------------------------- through the loaders

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def tiny() -> Any:
    return build_tiny_pipeline(0, torch.float32)


@pytest.fixture(scope="module")
def root(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("direct-loaders")
    tiny.save_pretrained(str(d / "diffusers"), safe_serialization=True)
    return d


def _assert_same(a: Any, b: Any) -> None:
    for name in COMPONENTS:
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sorted(sa) == sorted(sb), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)
        assert not mb.training and not any(p.requires_grad for p in mb.parameters()), name


SOURCES = {
    "diffusers": {},
    "bfl": {"transformer_layout": "bfl"},
    "bfl-prefixed": {"transformer_layout": "bfl", "transformer_prefix": "model.diffusion_model."},
    "diffusers-layout": {"transformer_layout": "diffusers"},
    "scaled-fp8": {"transformer_layout": "bfl", "transformer_dtype": torch.float8_e4m3fn, "scaled_fp8": True},
    # with ComfyUI's fp8 T5 file (every tensor fp8, its norms included)
    "fp8": {"transformer_layout": "diffusers", "transformer_dtype": torch.float8_e4m3fn, "t5_dtype": torch.float8_e4m3fn},
}


_WRITTEN: dict[Path, dict[str, Path]] = {}


def _source(tiny: Any, root: Path, kind: str, transformer_only: bool) -> ModelSource:
    if kind == "diffusers":
        return ModelSource(diffusers_dir=str(root / "diffusers"), transformer_only=transformer_only)
    folder = root / kind
    if folder not in _WRITTEN:
        _WRITTEN[folder] = write_single_files(tiny, folder, **SOURCES[kind])
    files = _WRITTEN[folder]
    if transformer_only:
        return ModelSource(transformer=str(files["transformer"]), transformer_only=True)
    return ModelSource.from_single_files(**files)


def _files_of(source: ModelSource, components: tuple[str, ...]) -> list[Path]:
    """The weight files of these components, in the order the loaders read them."""
    if source.kind == "diffusers":
        folder = Path(source.diffusers_dir or "")
        return [f for c in components for f in sorted((folder / c).glob("*.safetensors"))]
    by_component = {"transformer": source.transformer, "text_encoder": source.clip_l,
                    "text_encoder_2": source.t5xxl, "vae": source.vae}
    return [Path(by_component[c] or "") for c in components]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    read: list[Path] = []
    real = direct.read_tensors
    monkeypatch.setattr(direct, "read_tensors", lambda header, *a, **kw: read.append(header.path) or real(header, *a, **kw))
    return read


@pytest.mark.parametrize("transformer_only", [False, True], ids=["pipeline", "transformer-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_loaders_give_the_same_modules_either_way(tiny: Any, root: Path, kind: str, dtype: torch.dtype,
                                                  transformer_only: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source(tiny, root, kind, transformer_only)
    ordinary = load_pipeline(source, dtype)
    read = _spy(monkeypatch)
    read_to_device = load_pipeline(source, dtype, device=CPU)
    components = ("transformer",) if transformer_only else DIRECT_COMPONENTS
    assert sorted(read) == sorted(_files_of(source, components))  # every file of the pipeline read directly
    _assert_same(ordinary, read_to_device)
    if not transformer_only:  # T5's embedding stays tied to its input embedding, as from_pretrained leaves it
        t5 = read_to_device.text_encoder_2
        assert t5.shared.weight is t5.encoder.embed_tokens.weight
    # what the pipeline derives from its components (the tiny VAE's scale factor is not the default 8)
    assert read_to_device.vae_scale_factor == ordinary.vae_scale_factor


@pytest.mark.parametrize("kind", ["diffusers", "bfl"])
def test_a_pipeline_read_directly_makes_the_same_image(tiny: Any, root: Path, kind: str) -> None:
    """Tolerance 1e-5 (0..1 scale), as in test_loading.py: equal weights in other memory layouts take
    other CPU GEMM paths; the weights themselves are compared exactly above."""
    source = _source(tiny, root, kind, False)

    def image(pipe: Any) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=16).images

    a, b = image(load_pipeline(source, torch.float32)), image(load_pipeline(source, torch.float32, device=CPU))
    assert a.shape == b.shape == (1, 3, 64, 64)
    assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", ["diffusers", "bfl"])
def test_only_the_named_components_are_read_directly(tiny: Any, root: Path, kind: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine leaves T5 to the CPU path when bitsandbytes quantises it."""
    source = _source(tiny, root, kind, False)
    ordinary = load_pipeline(source, torch.float16)
    read = _spy(monkeypatch)
    some = ("transformer", "text_encoder", "vae")
    _assert_same(ordinary, load_pipeline(source, torch.float16, device=CPU, on_device=some))
    assert sorted(read) == sorted(_files_of(source, some))


def test_a_diffusers_shard_without_a_tensor_is_refused(tiny: Any, root: Path, tmp_path: Path) -> None:
    sub = tmp_path / "transformer"
    sub.mkdir()
    (sub / "config.json").write_text((root / "diffusers" / "transformer" / "config.json").read_text())
    sd = load_file(str(next((root / "diffusers" / "transformer").glob("*.safetensors"))))
    sd.pop("proj_out.weight")
    save_file(sd, str(sub / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"transformer file .*transformer does not match.*1 tensor\(s\) missing "
                                             r"\(e\.g\. proj_out\.weight\)"):
        load_pipeline(ModelSource(diffusers_dir=str(tmp_path), transformer_only=True), torch.float32,
                      device=CPU)


def test_bench_read_smoke(tmp_path: Path) -> None:
    """The GPU benchmark's own code path, on the tiny model: every way gives the same weights."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "read.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_read", str(out), "--work", str(tmp_path / "w"), "--tiny",
                    "--bfl"], cwd=root, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    res = json.loads(out.read_text())
    assert res["direct_equal"] and res["direct_again_equal"] and res["direct_bfl_equal"]
