"""Process-wide engines keyed by (model source, options).

The same key returns the same (compiled) engine; a new key releases the previous engine's memory
before the new one is built, so two sets of Flux weights never sit on the GPU at once. A released
engine (ComfyUI's "Unload models") is rebuilt on the next ``get_engine``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import deps
from .engine import FluxEngine
from .expected_compile import workers_before_checks
from .optimize import resolve
from .specs import EngineKey, EngineOptions, ModelSource

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_engines: dict[EngineKey, FluxEngine] = {}


def get_engine(source: ModelSource, options: EngineOptions | None = None,
               make_room: Callable[[int], None] | None = None) -> FluxEngine:
    """The engine for (source, options), built on first use. Options are validated before anything
    is released or loaded, so a typo never costs the engine you have. A missing required package
    raises ``DependencyError`` naming it (instead of a bare ModuleNotFoundError mid-load).
    ``make_room``: how a host holding other models on the GPU frees memory for a build
    (``FluxEngine``'s argument; ComfyUI's nodes pass its memory manager)."""
    options = options or EngineOptions()
    key = EngineKey(source, options)
    started = time.perf_counter()
    # a cold start's compile workers get going while the checks run (decision 47)
    workers = workers_before_checks(source, options) if peek(key) is None else None
    try:
        deps.require()
        resolved = resolve(options)  # device checks before anything is released
        checks_s = time.perf_counter() - started  # imports the optional packages it checks; starts CUDA
        with _lock:
            engine = _engines.get(key)
            if engine is not None and not engine.released:
                if workers is not None:
                    workers.close()
                return engine
            release_all()
            engine = FluxEngine(source, options, resolved=resolved, workers=workers, make_room=make_room)
            engine.phases.add("checks", checks_s)
            _engines[key] = engine
            return engine
    except BaseException:
        if workers is not None:
            workers.close()  # closing twice (the engine closes them on a failed build) is harmless
        raise


def peek(key: EngineKey) -> FluxEngine | None:
    with _lock:
        engine = _engines.get(key)
        return engine if engine is not None and not engine.released else None


def release(key: EngineKey | None = None) -> int:
    """Release one engine (or all when ``key`` is None). Returns how many were released."""
    if key is None:
        return release_all()
    with _lock:
        engine = _engines.pop(key, None)
        if engine is None:
            return 0
        engine.release()
        return 1


def release_all() -> int:
    with _lock:
        n = 0
        for key in list(_engines):
            engine = _engines.pop(key)
            if not engine.released:
                engine.release()
                n += 1
        return n


def engines() -> list[FluxEngine]:
    with _lock:
        return [e for e in _engines.values() if not e.released]
