"""Triton's per-process cache key, hashed on a thread of its own while the weights are read (decision 52).

The first Triton kernel a process launches looks for its compiled code in Triton's file cache under a key
that starts with ``triton.runtime.cache.triton_key()``: SHA-256 digests of Triton's own files, among them
its ``libtriton`` library (415 MB in Triton 3.6). Triton computes it once per process (``lru_cache``) on
the thread that launches first: in a warm start the loader's thread, in the fp8 kernels' check, 0.39 s of
its 0.58 s (py-spy, H100, 2026-12-06). ``hashlib`` releases the GIL while it hashes, so a thread of its
own computes the key beside the loader at almost no cost to it, and the first launch finds it cached.
The engine starts it before the weights are read; the thread imports Triton itself, work the loader's
thread would otherwise do in its idle list (decision 43), not in addition to it.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from . import deps
from .specs import EngineOptions

logger = logging.getLogger(__name__)

_thread: threading.Thread | None = None
_lock = threading.Lock()


def used(options: EngineOptions, device: torch.device) -> bool:
    """Whether an engine with ``options`` on ``device`` launches Triton kernels (inductor's, or the fp8
    ones of :mod:`.kernels` and :mod:`.fp8_projection`) and Triton is usable here (``deps.usable``,
    answered from the checks' record: no import)."""
    return (device.type == "cuda" and (options.compile != "off" or options.quantization == "fp8")
            and not deps.usable("triton"))


def start() -> None:
    """Import Triton and hash its key on a daemon thread, once per process; nothing when the key is
    already computed. Call it only where :func:`used` says so."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        _thread = threading.Thread(target=_hash, name="fastlora-triton-key", daemon=True)
        _thread.start()


def _hash() -> None:
    t0 = time.perf_counter()
    try:  # Triton imports neither torch nor anything of ours: no import cycle with the loader's thread
        from triton.runtime.cache import triton_key

        if triton_key.cache_info().currsize:  # an earlier launch in this process computed it
            return
        triton_key()
    except Exception as exc:  # noqa: BLE001 - the first launch imports and computes it again, and reports
        logger.info("hashing Triton's cache key failed (%s: %s); the first kernel launch does it", type(exc).__name__, exc)
        return
    logger.info("Triton's cache key hashed beside the loader in %.2f s", time.perf_counter() - t0)


def wait() -> None:
    """Let a hashing under way finish, so that a first kernel launch does not compute the key a second
    time (at once when none was started)."""
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()
