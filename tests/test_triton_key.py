"""Decision 52: Triton's per-process cache key is hashed on a thread of its own, once, and only where
Triton is already imported. A stand-in ``triton.runtime.cache`` (this machine has no Triton) holds an
``lru_cache``d ``triton_key`` as Triton's does."""

from __future__ import annotations

import functools
import sys
import threading
import time
import types

import pytest

from fastlora_core import triton_key


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A ``triton.runtime.cache`` whose key takes 0.2 s and records the thread that computed it."""
    calls: list[str] = []

    @functools.lru_cache
    def key() -> str:
        calls.append(threading.current_thread().name)
        time.sleep(0.2)
        return "3.6.0-abc"

    module = types.ModuleType("triton.runtime.cache")
    module.triton_key = key  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", module)
    monkeypatch.setattr(triton_key, "_thread", None)
    return calls


def test_the_key_is_hashed_once_on_a_thread_of_its_own_and_a_launch_waits_for_it(fake_triton: list[str]) -> None:
    t0 = time.perf_counter()
    triton_key.start()
    triton_key.start()  # a second engine in the same process: no second thread
    assert time.perf_counter() - t0 < 0.1, "start() must not compute the key on the caller's thread"
    triton_key.wait()  # what the fp8 kernels' checks do before their first launch
    key = sys.modules["triton.runtime.cache"].triton_key  # type: ignore[attr-defined]
    assert key() == "3.6.0-abc"  # the first launch's own call: a cache hit
    assert fake_triton == ["fastlora-triton-key"]


def test_nothing_starts_without_triton_imported_or_with_its_key_already_known(
        fake_triton: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    key = sys.modules["triton.runtime.cache"].triton_key  # type: ignore[attr-defined]
    key()  # an earlier launch in this process computed it
    triton_key.start()
    assert triton_key._thread is None and fake_triton == ["MainThread"]
    monkeypatch.delitem(sys.modules, "triton.runtime.cache")  # no Triton imported (nothing imports it here)
    triton_key.start()
    assert triton_key._thread is None
    triton_key.wait()  # nothing to wait for


def test_a_failed_hash_is_left_to_the_first_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    @functools.lru_cache
    def key() -> str:
        raise OSError("libtriton.so: permission denied")

    module = types.ModuleType("triton.runtime.cache")
    module.triton_key = key  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", module)
    monkeypatch.setattr(triton_key, "_thread", None)
    triton_key.start()
    triton_key.wait()
    with pytest.raises(OSError, match="permission denied"):  # Triton's own error, where Triton reports it
        key()
