"""Decision 52: Triton's per-process cache key is hashed on a thread of its own, once, beside the reads,
where the engine will launch Triton kernels. A stand-in ``triton.runtime.cache`` (this machine has no
Triton) holds an ``lru_cache``d ``triton_key`` as Triton's does."""

from __future__ import annotations

import functools
import sys
import threading
import time
import types

import pytest
import torch

from fastlora_core import deps, triton_key
from fastlora_core.specs import EngineOptions


def _fake_triton(monkeypatch: pytest.MonkeyPatch, key: object) -> None:
    module = types.ModuleType("triton.runtime.cache")
    module.triton_key = key  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", module)
    monkeypatch.setattr(triton_key, "_thread", None)


@pytest.fixture
def slow_key(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], object]:
    """A key that takes 0.2 s and records the thread that computed it."""
    calls: list[str] = []

    @functools.lru_cache
    def key() -> str:
        calls.append(threading.current_thread().name)
        time.sleep(0.2)
        return "3.6.0-abc"

    _fake_triton(monkeypatch, key)
    return calls, key


def test_the_key_is_hashed_once_on_a_thread_of_its_own_and_a_launch_waits_for_it(slow_key: tuple) -> None:
    calls, key = slow_key
    t0 = time.perf_counter()
    triton_key.start()
    triton_key.start()  # a second engine in the same process: no second thread
    assert time.perf_counter() - t0 < 0.1, "start() must not compute the key on the caller's thread"
    triton_key.wait()  # what the fp8 kernels' checks do before their first launch
    assert key() == "3.6.0-abc"  # the first launch's own call: a cache hit
    assert calls == ["fastlora-triton-key"]


def test_a_key_already_known_is_not_hashed_again(slow_key: tuple) -> None:
    calls, key = slow_key
    key()  # an earlier launch in this process computed it
    triton_key.start()
    triton_key.wait()
    assert calls == ["MainThread"]


def test_a_failed_import_or_hash_is_left_to_the_first_launch(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    @functools.lru_cache
    def key() -> str:
        raise OSError("libtriton.so: permission denied")

    _fake_triton(monkeypatch, key)
    triton_key.start()
    triton_key.wait()
    with pytest.raises(OSError, match="permission denied"):  # Triton's own error, where Triton reports it
        key()
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", None)  # Triton does not import here
    monkeypatch.setattr(triton_key, "_thread", None)
    with caplog.at_level("INFO", logger="fastlora_core.triton_key"):
        triton_key.start()
        triton_key.wait()
    assert "the first kernel launch does it" in caplog.text


def test_the_key_is_wanted_only_where_triton_kernels_will_run(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(deps, "usable", lambda name: "")
    assert triton_key.used(EngineOptions(compile="regional", quantization="none"), gpu)  # inductor's kernels
    assert triton_key.used(EngineOptions(compile="off", quantization="fp8"), gpu)  # the fp8 kernels
    assert not triton_key.used(EngineOptions(compile="off", quantization="none"), gpu)
    assert not triton_key.used(EngineOptions(compile="regional", quantization="fp8"), cpu)
    monkeypatch.setattr(deps, "usable", lambda name: "triton is not installed")
    assert not triton_key.used(EngineOptions(compile="regional", quantization="fp8"), gpu)
