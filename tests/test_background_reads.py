"""Weights read in the background while the loader imports and checks (decision 37).

The loaders start their direct reads (``loading.direct.BackgroundReads``) as soon as the headers say
what to read, before diffusers is imported and before the dry run on meta tensors; the modules are
built from what the reads hand over. These tests pin what a user relies on: the same modules as reading
afterwards, the reads really started first, a refused or unreadable model leaves no thread and no
tensors behind and says which file, and the switch interval and inference mode are as the caller had
them. Here the device is the CPU (the same code, synchronous copies).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from fastlora_core.errors import ModelLoadError
from fastlora_core.loading import (
    direct,
    load_pipeline,
    read_header,
    single_file,
    transformer_only,
    write_single_files,
)
from fastlora_core.specs import ModelSource
from fastlora_core.tiny import build_tiny_pipeline

CPU = torch.device("cpu")
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = build_tiny_pipeline(0, torch.float32)
    d = tmp_path_factory.mktemp("background")
    tiny.save_pretrained(str(d / "diffusers"), safe_serialization=True)
    files = write_single_files(tiny, d / "bfl", transformer_layout="bfl")
    (d / "bfl.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
    return d


def _sources(root: Path) -> dict[str, ModelSource]:
    files = json.loads((root / "bfl.json").read_text())
    return {
        "diffusers": ModelSource(diffusers_dir=str(root / "diffusers")),
        "bfl": ModelSource.from_single_files(**files),
        "diffusers-transformer-only": ModelSource(diffusers_dir=str(root / "diffusers"), transformer_only=True),
        "bfl-transformer-only": ModelSource(transformer=files["transformer"], transformer_only=True),
    }


def _no_reader_left() -> bool:
    return not any(t.name == "fastlora-read" and t.is_alive() for t in threading.enumerate())


def _assert_same(a: Any, b: Any) -> None:
    for name in COMPONENTS:
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is not None:
            sa, sb = ma.state_dict(), mb.state_dict()
            assert sorted(sa) == sorted(sb), name
            assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("kind", ["diffusers", "bfl", "diffusers-transformer-only", "bfl-transformer-only"])
def test_reads_start_before_the_checks_and_give_the_same_modules(root: Path, kind: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = _sources(root)[kind]
    monkeypatch.setattr(direct, "BACKGROUND", False)
    serial = load_pipeline(source, torch.bfloat16, device=CPU)
    monkeypatch.setattr(direct, "BACKGROUND", True)

    events: list[str] = []
    read_on: list[str] = []
    real_init, real_build, real_read = direct.BackgroundReads.__init__, single_file._build, direct.read_tensors

    def init(self: Any, jobs: Any, device: Any) -> None:
        events.append("reads started")
        real_init(self, jobs, device)

    def build(plan: Any, dtype: Any, dry_run: bool, *args: Any, **kwargs: Any) -> Any:
        events.append("dry run" if dry_run else "build")
        return real_build(plan, dtype, dry_run, *args, **kwargs)

    def read(*args: Any, **kwargs: Any) -> Any:
        read_on.append(threading.current_thread().name)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(direct.BackgroundReads, "__init__", init)
    monkeypatch.setattr(single_file, "_build", build)
    monkeypatch.setattr(transformer_only, "_build", build)
    monkeypatch.setattr(direct, "read_tensors", read)
    background = load_pipeline(source, torch.bfloat16, device=CPU)

    assert events[0] == "reads started" and "dry run" in events, events
    expected = 1 if "transformer-only" in kind else 4  # files: the tiny diffusers folder has one per component
    assert read_on == ["fastlora-read"] * expected
    _assert_same(serial, background)
    assert _no_reader_left()


def test_a_model_refused_by_the_dry_run_stops_the_reads(root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformer config that does not match its weights is found by the dry run, after the reads
    started: the same refusal as without them, and nothing left running or held."""
    folder = tmp_path / "model"
    shutil.copytree(root / "diffusers", folder)
    config = folder / "transformer" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["num_single_layers"] += 1
    config.write_text(json.dumps(cfg))
    source = ModelSource(diffusers_dir=str(folder))

    monkeypatch.setattr(direct, "BACKGROUND", False)
    with pytest.raises(ModelLoadError) as serial:
        load_pipeline(source, torch.float32, device=CPU)
    monkeypatch.setattr(direct, "BACKGROUND", True)
    started: list[direct.BackgroundReads] = []
    real_init = direct.BackgroundReads.__init__

    def init(self: Any, jobs: Any, device: Any) -> None:
        real_init(self, jobs, device)
        started.append(self)

    monkeypatch.setattr(direct.BackgroundReads, "__init__", init)
    interval = sys.getswitchinterval()
    with pytest.raises(ModelLoadError) as background:
        load_pipeline(source, torch.float32, device=CPU)
    assert str(background.value) == str(serial.value)
    assert "does not match" in str(background.value) and "transformer" in str(background.value)
    assert started and not started[0]._results  # reads were under way; what they read was dropped
    assert _no_reader_left()
    assert sys.getswitchinterval() == interval


def test_an_unreadable_file_is_named_by_the_loader(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error in the reading thread reaches the caller as the loader's error, naming the file."""
    source = _sources(root)["bfl"]
    transformer = Path(source.transformer or "")
    real = direct.read_exactly

    def failing(path: Any, fd: int, view: memoryview, offset: int) -> None:
        if Path(path) == transformer:
            raise OSError("Input/output error")
        real(path, fd, view, offset)

    monkeypatch.setattr(direct, "read_exactly", failing)
    with pytest.raises(ModelLoadError, match=rf"transformer file {transformer}.* could not be read .*Input/output"):
        load_pipeline(source, torch.float32, device=CPU)
    assert _no_reader_left()


def _two_files(tmp_path: Path) -> list[tuple[Any, list[str], str]]:
    jobs = []
    for i in range(2):
        path = tmp_path / f"f{i}.safetensors"
        save_file({"w": torch.full((64, 64), float(i)), "b": torch.arange(5.0)}, str(path))
        header = read_header(path)
        jobs.append((header, sorted(header.tensors), "model"))
    return jobs


def test_take_hands_over_each_file_once_and_close_drops_the_rest(tmp_path: Path) -> None:
    jobs = _two_files(tmp_path)
    interval = sys.getswitchinterval()
    with direct.BackgroundReads(jobs, CPU) as reads:
        assert sys.getswitchinterval() <= direct.SWITCH_INTERVAL_S
        first = reads.take(jobs[0][0], jobs[0][1])
        assert torch.equal(first["w"], torch.zeros(64, 64)) and torch.equal(first["b"], torch.arange(5.0))
        assert not reads.planned(jobs[0][0], jobs[0][1])  # handed over: a second take reads again
        assert torch.equal(reads.take(jobs[0][0], ["w"])["w"], torch.zeros(64, 64))
    assert not reads._results and _no_reader_left()
    assert sys.getswitchinterval() == interval


def test_a_stopped_read_raises_cancelled(tmp_path: Path) -> None:
    header, names, _ = _two_files(tmp_path)[0]
    stop = threading.Event()
    stop.set()
    with pytest.raises(direct.ReadCancelled):
        direct.read_tensors(header, names, CPU, stop=stop)


@pytest.mark.parametrize("inference", [True, False])
def test_tensors_follow_the_callers_inference_mode(tmp_path: Path, inference: bool) -> None:
    """ComfyUI builds engines under inference mode: the weights must be what reading there would give."""
    jobs = _two_files(tmp_path)
    with torch.inference_mode(inference), direct.BackgroundReads(jobs, CPU) as reads:
        got = reads.take(jobs[1][0], jobs[1][1])
    assert got["w"].is_inference() == inference


def test_take_waits_for_reads_still_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader usually asks for a file before its read is done (on the GPU the checks are faster
    than reading 24 GB): take must wait for it, file after file, and get every file."""
    jobs = _two_files(tmp_path)
    real = direct.read_tensors
    gate = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, "read_tensors", slow)
    with direct.BackgroundReads(jobs, CPU) as reads:
        threading.Timer(0.2, gate.set).start()
        got = [reads.take(header, names) for header, names, _ in jobs]
    assert [float(g["w"][0, 0]) for g in got] == [0.0, 1.0]
    assert _no_reader_left()


def test_work_handed_over_runs_while_a_read_is_under_way_and_only_then(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 42: the loader imports what the first image needs instead of blocking on a read; a
    read already done is handed over without delay, and a failing task only costs a log line."""
    jobs = _two_files(tmp_path)
    real = direct.read_tensors
    gate = threading.Event()
    ran: list[str] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        gate.wait(5)
        return real(*args, **kwargs)

    def failing() -> None:
        ran.append("failing")
        raise ImportError("no such module")

    def task() -> None:
        ran.append("task" if not gate.is_set() else "task after the read")
        gate.set()

    monkeypatch.setattr(direct, "read_tensors", slow)
    with direct.while_waiting(failing, task), direct.BackgroundReads(jobs, CPU) as reads:
        first = reads.take(jobs[0][0], jobs[0][1])
    assert ran == ["failing", "task"] and torch.equal(first["w"], torch.zeros(64, 64))

    ran.clear()
    with direct.while_waiting(task), direct.BackgroundReads(jobs[:1], CPU) as reads:
        reads._thread.join()  # the read is done before the loader asks for it
        reads.take(jobs[0][0], jobs[0][1])
    assert ran == [] and not direct._idle  # not run, and dropped with the block

    monkeypatch.setattr(direct, "IDLE_WORK", False)
    gate.clear()
    threading.Timer(0.2, gate.set).start()
    with direct.while_waiting(task), direct.BackgroundReads(jobs[:1], CPU) as reads:
        reads.take(jobs[0][0], jobs[0][1])
    assert ran == []


def test_a_read_tells_the_disk_from_the_page_cache_by_its_first_bytes_rate(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    header, names, _ = _two_files(tmp_path)[0]
    for bound, probe, expected in ((1e9, 1, True), (0.0, 1, False), (1e9, 2**40, False)):  # (no probe: too few bytes)
        monkeypatch.setattr(direct, "DISK_BOUND_GBPS", bound)
        monkeypatch.setattr(direct, "DISK_PROBE_BYTES", probe)
        calls: list[int] = []
        direct.read_tensors(header, names, CPU, on_disk=partial(calls.append, 1))
        assert calls == ([1] if expected else [])  # once at most


def test_a_read_from_the_disk_hands_the_idle_work_to_a_thread_of_its_own(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 49: on a disk-cold start the loader's own steps are slowed by the disk as much as the
    reads, so it never waits for one and the idle work used to run only on the first image. Once a read
    is seen to come slower than the page cache would give, a thread of its own does that work while the
    reads go on, without the loader asking for a file; at page-cache speed it stays the loader's."""
    jobs = _two_files(tmp_path)
    real = direct.read_tensors
    gate = threading.Event()
    ran: list[str] = []

    def read_then_hold(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)  # probes the rate (every read "slow" below), then holds the read open
        gate.wait(5)
        return out

    def task() -> None:
        ran.append(threading.current_thread().name)
        gate.set()

    monkeypatch.setattr(direct, "read_tensors", read_then_hold)
    monkeypatch.setattr(direct, "DISK_PROBE_BYTES", 1)
    monkeypatch.setattr(direct, "DISK_BOUND_GBPS", 1e9)
    with direct.while_waiting(task), direct.BackgroundReads(jobs, CPU) as reads:
        assert gate.wait(5)  # the loader is busy elsewhere: it has not asked for a file
        assert ran == ["fastlora-idle"]
        got = [reads.take(header, names) for header, names, _ in jobs]
    assert [float(g["w"][0, 0]) for g in got] == [0.0, 1.0] and not direct._idle

    ran.clear()
    gate.clear()
    monkeypatch.setattr(direct, "DISK_BOUND_GBPS", 0.0)  # page-cache speed: the work waits for the loader
    with direct.while_waiting(task), direct.BackgroundReads(jobs, CPU) as reads:
        assert not gate.wait(0.5) and ran == []
        reads.take(jobs[0][0], jobs[0][1])
    assert ran == [threading.current_thread().name]


def test_the_loader_is_handed_the_first_images_and_the_first_fp8_swaps_once_only_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions 42 and 43's work list: the optional packages vouched for from a record, first; the
    compiler's imports whenever something will compile; the fp8 kernels' check where the first fused
    fp8 swap on a GPU would run it, and there the fp8 projection kernel's check (decision 44; the
    adapter strategy's LoRA layer replaces that projection); nothing for other set-ups."""
    from fastlora_core import deps, idle_work
    from fastlora_core.specs import EngineOptions

    monkeypatch.setattr(deps, "_deferred", [])

    def names(device: str, **options: Any) -> list[str]:
        return [task.__name__ for task in idle_work.while_reading(EngineOptions(**options), torch.device(device))]

    fp8 = dict(quantization="fp8", swap_strategy="fused", compile="regional")
    check = "check_projection_kernel"  # decision 44's kernel, where fused fp8 layers run on a GPU
    assert names("cuda", **fp8) == ["import_compiler", "prepare_fp8_swaps", check]
    assert names("cuda", **{**fp8, "compile": "off"}) == ["prepare_fp8_swaps", check]
    assert names("cuda", **{**fp8, "swap_strategy": "adapter"}) == ["import_compiler"]
    assert names("cuda", **{**fp8, "quantization": "none"}) == ["import_compiler"]
    assert names("cpu", **fp8) == ["import_compiler"]
    monkeypatch.setattr(deps, "_deferred", ["fastlora_not_imported_anywhere"])  # vouched for, not imported
    assert names("cuda", **fp8) == ["import_deferred", "import_compiler", "prepare_fp8_swaps", check]


def test_the_fp8_kernel_check_runs_once_per_process_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the engine's loader ran it or the first swap does, the self-check runs once per GPU:
    a second engine (or the swap after the loader's run) takes the remembered result."""
    from fastlora_core.lora import fused

    calls: list[torch.device] = []
    monkeypatch.setattr(fused, "_kernels_ok", {})
    monkeypatch.setattr(fused, "_triton_fp8_self_check", lambda device: calls.append(device) or device.index == 0)
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert fused.fp8_kernels_ok(gpu0) and fused.fp8_kernels_ok(gpu0)
    assert not fused.fp8_kernels_ok(gpu1) and not fused.fp8_kernels_ok(gpu1)
    assert calls == [gpu0, gpu1]
    fused.prepare_fp8_swaps(CPU)  # nothing to prepare for the CPU
    assert calls == [gpu0, gpu1]


def _reading_thread_torch_calls(files: list[Path]) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """The names of the torch calls the reading thread made while reading ``files`` (one
    :class:`BackgroundReads`), and what :meth:`take` gave for each file."""
    headers = [read_header(path) for path in files]
    calls: list[str] = []

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and threading.current_thread().name == "fastlora-read":
            owner = getattr(arg, "__self__", None)
            module = getattr(arg, "__module__", None) or type(owner).__module__
            if isinstance(owner, torch.Tensor) or str(module).startswith("torch"):
                calls.append(getattr(arg, "__name__", repr(arg)))

    threading.setprofile(count)
    try:
        with direct.BackgroundReads([(h, list(h.tensors), "model") for h in headers], CPU) as reads:
            got = [reads.take(h, list(h.tensors)) for h in headers]
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    return calls, got


def test_the_reading_thread_makes_about_one_torch_call_per_tensor(tmp_path: Path) -> None:
    """Decision 50: each torch call on the reading thread waits to take the GIL back from the busy
    loader (~0.8 ms on the H100 hosts), so the thread allocates each tensor and otherwise makes a few
    calls per chunk (one copy for all of a chunk's pieces); the views that give each tensor its dtype
    and shape are made by the thread that takes the file. Per-piece copies or per-tensor views on the
    reading thread would make it three or more calls per tensor again. The tensors still arrive exact."""
    n = 300
    tensors = {f"t{i:03d}": torch.randn(4, 8 + i % 5).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(n)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    calls, (got,) = _reading_thread_torch_calls([path])
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    # one allocation each (a quantised layer frees its own bytes), and the two staging chunks
    assert calls.count("empty") == n + 2
    assert len(calls) <= n + 20, sorted(set(calls))


def test_one_pair_of_staging_chunks_serves_every_file_of_a_start(tmp_path: Path) -> None:
    """Decision 53: pinning two 256 MB chunks per file cost a warm start 0.11-0.16 s over five files;
    the reading thread keeps one pair for all of them, grown only when a later file needs more (the
    transformer comes first). Every file's tensors still arrive exact."""
    sizes = [(64, 64), (8, 8), (96, 96)]  # the third file needs larger chunks than the first
    files, want = [], []
    for i, (rows, cols) in enumerate(sizes):
        tensors = {f"f{i}.t{j}": torch.randn(rows, cols) for j in range(3)}
        files.append(tmp_path / f"part{i}.safetensors")
        save_file(tensors, str(files[-1]))
        want.append(tensors)
    calls, got = _reading_thread_torch_calls(files)
    assert all(torch.equal(g[k], v) for g, w in zip(got, want) for k, v in w.items())
    assert calls.count("empty") == 9 + 2 + 2  # a tensor each; a pair for the first file, grown once for the third
