"""Triton's per-process cache key, hashed on a thread of its own while the weights are read (decision 52).

The first Triton kernel a process launches looks for its compiled code in Triton's file cache under a key
that starts with ``triton.runtime.cache.triton_key()``: SHA-256 digests of Triton's own files, among them
its ``libtriton`` library (415 MB in Triton 3.6). Triton computes it once per process (``lru_cache``) on
the thread that launches first: in a warm start the loader's thread, in the fp8 kernels' check, 0.39 s of
its 0.58 s (py-spy, H100, 2026-12-06). ``hashlib`` releases the GIL while it hashes, so a thread of its
own computes the key beside the loader at almost no cost to it, and the first launch finds it cached.
Nothing here imports Triton: :func:`start` does nothing until the caller's imports brought it in.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_thread: threading.Thread | None = None
_lock = threading.Lock()


def _cached_key_function() -> Callable[[], str] | None:
    """Triton's ``triton_key`` when Triton is imported and the key is not computed yet, else None."""
    cache = sys.modules.get("triton.runtime.cache")
    key = getattr(cache, "triton_key", None)
    info = getattr(key, "cache_info", None)  # an lru_cache: another Triton may compute it differently
    if key is None or info is None or info().currsize:
        return None
    return key


def start() -> None:
    """Start hashing on a daemon thread, once per process; nothing where Triton is not imported, or its
    key is already computed."""
    global _thread
    with _lock:
        key = _cached_key_function()
        if _thread is not None or key is None:
            return
        _thread = threading.Thread(target=_hash, args=(key,), name="fastlora-triton-key", daemon=True)
        _thread.start()


def _hash(key: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    try:
        key()
    except Exception as exc:  # noqa: BLE001 - the first launch computes it again and reports
        logger.info("hashing Triton's cache key failed (%s: %s); the first kernel launch does it", type(exc).__name__, exc)
        return
    logger.info("Triton's cache key hashed beside the loader in %.2f s", time.perf_counter() - t0)


def wait() -> None:
    """Let a hashing under way finish, so that a first kernel launch does not compute the key a second
    time (at once when none was started)."""
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()
