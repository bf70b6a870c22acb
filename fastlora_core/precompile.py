"""Regional compilation whose compiled blocks are saved to disk and loaded without re-tracing.

With ``compile=regional`` every process start used to re-trace the two Flux block classes with Dynamo
even when inductor's cache held the compiled kernels: 2.6-3.5 s of a warm start on the H200
(ARCHITECTURE decision 40). PyTorch's explicit precompile API (``torch.compile(fn).aot_compile(...)``,
``torch.compiler.load_compiled_function``) compiles a function once for example inputs and saves the
result, guards included; a later process loads it and calls it without tracing.

What the saved guards cannot carry is identity: Dynamo guards a block's parameters, and the attention
kernel a block calls, by object, and those objects are new in every process (torchao's fp8 weights
cannot be written into a saved guard at all). This module therefore keeps the guards Dynamo can save
(input shapes, strides, dtypes, grad mode, the blocks' module tree and their constant attributes) and
guards the rest itself:

* **the file's key** (:mod:`.block_keys`) hashes the software (torch, Triton, torchao, Python, this format), the device,
  the source files of every module class in the block, the block's parameters (name, type, shape,
  dtype, strides, a quantised tensor's layout), the names and closures of the functions the block's
  modules hold (the attention kernel), and the call's inputs and grad mode. Anything that would trace
  differently hashes differently;
* **every call** checks that each block still holds the same parameter objects, submodules, attribute
  values and classes it was fingerprinted with, and as many of each (tens of identity tests); a change
  re-fingerprints the block before the call.

Sizes follow Dynamo's automatic dynamic shapes: a block class's first size gets a graph for exactly
that size, its second one graph with dynamic shapes that every later size reuses. That graph is traced
with one size symbol per input dimension (:func:`_size_symbols`), so it holds no equality between sizes
that only happened to be equal when it was traced.

A guard that still fails (something only Dynamo checks changed) or a file that will not load compiles
the block again from source and replaces the file. Anything this module cannot do (an older torch, a
block Dynamo cannot save) falls back to plain ``torch.compile`` of the block, logged, so compilation
never becomes less available than before.

With background workers (:mod:`.background_compile`, opt-in, decision 41) a graph that is neither loaded
nor saved is compiled by a worker process instead; the blocks run uncompiled until its file appears.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic_write import is_partial, write_whole
from .block_keys import (
    Fingerprint,
    call_signature,
    device_id,
    fingerprint,
    in_inference_mode,
    software,
    source,
)

if TYPE_CHECKING:
    from .background_compile import BackgroundCompiler, Job

logger = logging.getLogger(__name__)

#: The folder (under the compile cache) that holds the saved blocks.
FOLDER = "fastlora-blocks"

#: A saved file neither loaded nor written for this long is deleted when the folder next gets a file
#: (an upgrade of torch or of the pack, another GPU or other options leave files no process will load).
UNUSED_DAYS = 30

#: ``FASTLORA_PRECOMPILE=0`` turns saving and loading compiled blocks off (plain regional
#: ``torch.compile``, re-traced in every process): a switch for comparisons and a way out.
ENV_SWITCH = "FASTLORA_PRECOMPILE"

#: How long a block waits for a worker compiling its graph ahead (decision 45) before compiling it
#: here: a worker that died replies at once; this bounds one that hangs (a compile takes 5-15 s).
AHEAD_WAIT_S = 300.0


_in_process_lock = threading.Lock()
_in_process_loads = 0  # loads under way that keep inductor's compile pool unstarted
_threads_before: Any = None  # inductor's compile_threads before the first of them


@contextlib.contextmanager
def _kernels_loaded_in_process() -> Iterator[None]:
    """Inductor's ``compile_threads`` at 1 while a saved graph loads (decision 56). Loading one makes
    its Triton kernels ready through inductor's ``AsyncCompile.triton``, which starts the process's pool
    of compile processes on its first call (a sidecar process that imports torch) although every kernel
    of a saved graph is already compiled. With one thread inductor readies them where it is, as it does
    until the pool answers anyway; a later compile in this process starts the pool as before. Counted,
    so that two engines loading on two threads at once restore it once, after the later load."""
    import torch._inductor.config as inductor_config

    global _in_process_loads, _threads_before
    with _in_process_lock:
        if _in_process_loads == 0:
            _threads_before = inductor_config.compile_threads
            inductor_config.compile_threads = 1
        _in_process_loads += 1
    try:
        yield
    finally:
        with _in_process_lock:
            _in_process_loads -= 1
            if _in_process_loads == 0:
                inductor_config.compile_threads = _threads_before


def load_saved(path: Path) -> Callable[..., Any]:
    """The compiled function saved in ``path`` (``torch.compiler.load_compiled_function``), its kernels
    readied in this process. Raises what the load raises."""
    with open(path, "rb") as f, _kernels_loaded_in_process():
        return torch.compiler.load_compiled_function(f)


def why_not_here(dynamic: bool) -> str:
    """Why no transformer's blocks can be precompiled in this process ("" when FastLoRA's own can)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if dynamic:
        return "dynamic_shapes compiles one graph for every size; saved blocks are per size"
    if not hasattr(torch.compiler, "load_compiled_function"):
        return f"torch {torch.__version__} has no precompile API (torch.compiler.load_compiled_function)"
    return ""


def why_not(transformer: torch.nn.Module, dynamic: bool) -> str:
    """Why the blocks of ``transformer`` cannot be precompiled here ("" when they can)."""
    why = why_not_here(dynamic)
    if why:
        return why
    from .runtime.flux import FluxTransformer

    if not isinstance(transformer, FluxTransformer):
        return (f"{type(transformer).__name__} is not FastLoRA's own Flux transformer (diffusers' blocks "
                "hold attention processors and hooks a saved guard cannot hold)")
    return ""


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles (the transformer's ``_repeated_blocks`` classes)."""
    names = getattr(transformer, "_repeated_blocks", ())
    return [m for m in transformer.modules() if type(m).__name__ in names]


# --------------------------------------------------------------------------------------------------
# Compiling, saving, loading
# --------------------------------------------------------------------------------------------------


def _serialisable_guards(entries: Iterable[Any]) -> list[bool]:
    """Keep the guards a saved file can hold: not globals, not identity (ID/closure matches), not the
    parameters (new objects in every process; quantised ones cannot be written). The fingerprint and
    :meth:`Fingerprint.still_valid` stand in for the dropped ones."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (e.is_global or e.guard_type in unsupported or "_parameters" in e.name or "_buffers" in e.name)
            for e in entries]


def make_picklable(block: torch.nn.Module) -> None:
    """Drop torchao's per-instance ``extra_repr`` (a partial bound to the layer, which the guard
    pickler cannot write); the class's own ``extra_repr`` takes over (the weight's type still shows
    in its repr)."""
    for module in block.modules():
        value = module.__dict__.get("extra_repr")
        if isinstance(value, types.MethodType) and isinstance(value.__func__, functools.partial):
            del module.__dict__["extra_repr"]


@dataclass
class PrecompileStats:
    """What the blocks' dispatch did in this process."""

    compiled: int = 0
    loaded: int = 0
    saved: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    background: int = 0  # graphs compiled by a background worker and loaded (decisions 41, 45)
    waited_seconds: float = 0.0  # time a block waited for a worker's graph (decision 45)
    eager_calls: int = 0  # block calls run uncompiled while a worker compiled their graph
    workers: list[dict[str, Any]] = field(default_factory=list)  # each loaded worker graph's timeline
    failures: list[str] = field(default_factory=list)


class PrecompiledBlocks:
    """The compiled forward of each block class, per block fingerprint and call signature, loaded
    from ``folder`` when saved there, else compiled and saved. Install with :meth:`install`."""

    def __init__(self, folder: Path, device: torch.device, background: BackgroundCompiler | None = None,
                 ahead: bool = False, expected: Iterable[Job] = ()) -> None:
        self.folder = folder
        self.device = device
        self.background = background  # workers that compile missing graphs (decision 41), or None
        # ``ahead`` (decision 45): while this process compiles the first block class, workers compile
        # the other classes for the same call, and their blocks wait for those graphs (never eager).
        # Without it, a missing graph goes to a worker and its blocks run eagerly meanwhile (decision 41).
        self.ahead = ahead
        # workers compiling the expected first request's graphs since the reads began (decision 47):
        # each is matched against the first slot of its block class, then dropped
        self._expected: list[Job] = list(expected)
        self._classes: dict[type, torch.nn.Module] = {}  # the first block of each class
        self._pending: dict[tuple, Job] = {}  # slots a worker is compiling
        self.stats = PrecompileStats()
        self._functions: dict[tuple, Callable[..., Any]] = {}
        self._fingerprints: dict[int, Fingerprint] = {}
        self._plain: dict[type, str] = {}  # block classes that fell back to torch.compile, and why
        self._static_only: set[type] = set()  # block classes a dynamic-shape graph failed for
        self._lock = threading.RLock()

    def install(self, blocks: Iterable[torch.nn.Module]) -> int:
        """Route every block's calls through :meth:`_call` (the slot ``Module.compile`` uses, so the
        block's own ``forward`` and state stay as they are); returns how many blocks."""
        n = 0
        for block in blocks:
            make_picklable(block)
            self._classes.setdefault(type(block), block)
            block._compiled_call_impl = functools.partial(self._call, block)
            n += 1
        return n

    def report(self) -> dict[str, Any]:
        """What this process did with saved blocks (GET /fastlora/stats): compiled, loaded, saved,
        seconds, failures, and how many block graphs background workers are compiling now."""
        return {**dataclasses.asdict(self.stats), "compiling_in_background": len(self._pending),
                "folder": str(self.folder)}

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until background workers have finished the graphs they are compiling (True), or
        ``timeout`` seconds have passed (False). The next call of each block then loads its graph."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        for job in list(self._pending.values()):
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not job.done.wait(left):
                return False
        return True

    # -- the call ------------------------------------------------------------------------------
    def _call(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if type(block) in self._plain:
            return self._to_plain(block)(*args, **kwargs)
        if (block._forward_hooks or block._forward_pre_hooks or torch.nn.modules.module._global_forward_hooks
                or torch.nn.modules.module._global_forward_pre_hooks):
            return block._call_impl(*args, **kwargs)  # a compiled forward would skip the hooks
        slot = (type(block), self._digest(block), call_signature(args, kwargs))
        fn = self._functions.get(slot)
        if fn is None:
            fn = self._get(slot, block, args, kwargs)
            if fn is None:
                return self._to_plain(block)(*args, **kwargs)
            if fn is _EAGER:  # a worker is compiling it
                self.stats.eager_calls += 1
                return block._call_impl(*args, **kwargs)
        try:
            return fn(block, *args, **kwargs)
        except RuntimeError as exc:
            guard_check = getattr(fn, "guard_check", None)
            if guard_check is None or guard_check(block, *args, **kwargs):
                raise  # not a guard: the block's own error (an out-of-memory, a bad input)
            logger.info("compiled %s: a saved guard failed (%s); compiling it again", type(block).__name__,
                        " ".join(str(exc).split())[-300:])
            with self._lock:
                fn = self._compile(slot, block, args, kwargs)
                if fn is None:
                    self._plain[type(block)] = self.stats.failures[-1]
                    return self._to_plain(block)(*args, **kwargs)
                self._functions[slot] = fn
            return fn(block, *args, **kwargs)

    def _digest(self, block: torch.nn.Module) -> str:
        """``block``'s fingerprint digest, computed again only when the block changed since the last."""
        fp = self._fingerprints.get(id(block))
        if fp is None or not fp.still_valid():
            fp = self._fingerprints[id(block)] = fingerprint(block)
        return fp.digest

    def _to_plain(self, block: torch.nn.Module) -> Callable[..., Any]:
        """Plain regional ``torch.compile`` for this block (what ``Module.compile`` installs)."""
        compiled = torch.compile(block._call_impl, fullgraph=True)
        block._compiled_call_impl = compiled
        return compiled

    def _prefix(self, cls: type, digest: str, inference: bool) -> str:
        """The part of a file name fixed by the software, the device, the block and the autograd mode
        (files of one block as it is now sort together); the call's inputs make the rest."""
        text = repr((software(), device_id(self.device), source(cls), digest, inference))
        return f"{cls.__name__}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"

    def path(self, slot: tuple) -> Path:
        cls, digest, signature = slot
        rest = hashlib.sha256(repr(signature).encode()).hexdigest()[:20]
        return self.folder / f"{self._prefix(cls, digest, in_inference_mode(signature))}-{rest}.bin"

    def _read(self, path: Path, cls: type) -> Callable[..., Any] | None:
        """Deserialise one saved file (None when it does not load: it is compiled again and replaced)."""
        t0 = time.perf_counter()
        try:
            fn = load_saved(path)
        except Exception as exc:  # a damaged or foreign file
            logger.warning("could not load the compiled block %s (%s: %s); compiling it again",
                           path, type(exc).__name__, exc)
            return None
        seconds = time.perf_counter() - t0
        _mark_used(path)
        self.stats.loaded += 1
        self.stats.load_seconds += seconds
        logger.info("loaded compiled %s from %s (%.2f s)", cls.__name__, path, seconds)
        return fn

    def _get(self, slot: tuple, block: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
        """The slot's function. Like Dynamo's automatic dynamic shapes: the first size a block class
        sees gets a graph for exactly that size; a second size gets one graph with dynamic shapes that
        serves every later size. Each is loaded from its file when saved, else compiled and saved.
        None when this block class cannot be precompiled (it then runs plain ``torch.compile``)."""
        with self._lock:
            fn = self._functions.get(slot)
            if fn is not None or type(block) in self._plain:
                return fn
            fn = self._load(slot, block)
            if fn is None:
                cls, digest, _ = slot
                dynamic_slot = (cls, digest, call_signature(args, kwargs, sizes=False))
                fn = self._functions.get(dynamic_slot) or self._load(dynamic_slot, block)
                second_size = any(s[:2] == slot[:2] for s in self._functions)
                if fn is None and second_size and cls not in self._static_only:
                    fn = self._compile_or_hand_over(dynamic_slot, block, args, kwargs, dynamic=True)
                    if fn is None:
                        self._static_only.add(cls)
                if fn is None:
                    fn = self._compile_or_hand_over(slot, block, args, kwargs)
                    if fn is None:
                        self._plain[cls] = self.stats.failures[-1]
                        return None
            if fn is not _EAGER:
                self._functions[slot] = fn
            return fn

    def _compile_or_hand_over(self, slot: tuple, block: torch.nn.Module, args: tuple, kwargs: dict,
                              dynamic: bool = False) -> Callable[..., Any] | None:
        """:meth:`_compile`, or with background workers: hand the slot to one and return ``_EAGER``
        until it has saved the file, then load it. A worker's failure compiles the slot here."""
        job = self._pending.get(slot)
        if job is None and not dynamic:
            job = self._expected_job(slot)
        if job is None and self.background is not None:
            if self.ahead:
                self._hand_over_others(type(block), args, kwargs, dynamic)
            else:
                job = self.background.submit(block, slot[1], self.path(slot), args, kwargs, dynamic)
                if job is not None:
                    self._pending[slot] = job
        if job is not None:
            if not job.done.is_set():
                if not self.ahead:
                    return _EAGER
                t0 = time.perf_counter()
                if not job.done.wait(AHEAD_WAIT_S):
                    job.error = f"no reply after {AHEAD_WAIT_S:.0f} s"
                self.stats.waited_seconds += time.perf_counter() - t0
            fn = self._load(slot, block) if job.ok and job.done.is_set() else None
            self._pending.pop(slot, None)
            if fn is not None:
                return fn
            logger.warning("the compile worker could not compile %s (%s); compiling it here", job.block,
                           job.error or "its file did not load")
        return self._compile(slot, block, args, kwargs, dynamic)

    def _hand_over_others(self, cls: type, args: tuple, kwargs: dict, dynamic: bool) -> None:
        """Hand every other block class that has no graph for this call to a worker (decision 45).
        Flux's two block classes are called with the same inputs (hidden states, text states,
        embedding, rotary tables, by keyword), so this call's signature is theirs; where it is not,
        the worker's file lands under a name no block asks for and that class compiles here."""
        assert self.background is not None
        for other, block in self._classes.items():
            if other is cls or other in self._plain:
                continue
            slot = (other, self._digest(block), call_signature(args, kwargs, sizes=not dynamic))
            if (slot in self._functions or slot in self._pending or self.path(slot).is_file()
                    or (not dynamic and self._expected_job(slot) is not None)):
                continue
            job = self.background.submit(block, slot[1], self.path(slot), args, kwargs, dynamic)
            if job is not None:
                self._pending[slot] = job

    def _expected_job(self, slot: tuple) -> Job | None:
        """The worker compiling this slot's graph for the expected first request (decision 47), now
        pending for it; or None. Each such job is matched once, against the first slot of its block
        class: its worker names the file it compiles (waited for, as a graph compiled ahead is) and a
        different name (another size, or a block prepared unlike the specimen) cancels it, so that
        its CPU goes to the compiles this request needs."""
        name = slot[0].__name__
        for job in [j for j in self._expected if j.block == name]:
            self._expected.remove(job)
            t0 = time.perf_counter()
            job.announced.wait(AHEAD_WAIT_S)
            self.stats.waited_seconds += time.perf_counter() - t0
            if job.path == str(self.path(slot)) and not job.error:
                self._pending[slot] = job
                return job
            logger.info("the first %s call is not the expected request's (%s); compiling it as usual", name,
                        job.error or "another size or another block")
            if self.background is not None:
                self.background.cancel(job)
        return None

    def _load(self, slot: tuple, block: torch.nn.Module) -> Callable[..., Any] | None:
        """The slot's saved function, or None (no file, or one that does not load)."""
        fn = self._functions.get(slot)
        if fn is not None:
            return fn
        path = self.path(slot)
        fn = self._read(path, type(block)) if path.is_file() else None
        if fn is not None:
            self._functions[slot] = fn
            job = self._pending.pop(slot, None)
            if job is None:  # saved by a worker for the expected first request before it was asked for
                job = next((j for j in self._expected if j.path == str(path)), None)
                if job is not None:
                    self._expected.remove(job)
            if job is not None:  # saved by a worker (it may not have replied yet)
                self.stats.background += 1
                self.stats.workers.append(job.timeline())
                logger.info("%s compiled by a worker and loaded", job.block)
        return fn

    @staticmethod
    def _trace(compiler: Any, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """``aot_compile`` with Dynamo's restarts: a dynamic-shape trace asks to start over once it
        knows which float scalars to specialise (``TensorifyScalarRestartAnalysis``, remembered
        for the next attempt); ``torch.compile`` restarts by itself, the precompile API does not."""
        from torch._dynamo.exc import RestartAnalysis
        from torch._dynamo.utils import counters

        global _EXTRA_GRAPHS
        before = counters["stats"]["unique_graphs"]
        made = 0
        try:
            for attempt in range(4):
                try:
                    fn = compiler.aot_compile(((block, *args), kwargs))
                    made = 1
                    return fn
                except RestartAnalysis:
                    if attempt == 3:
                        raise
            raise AssertionError("unreachable")
        finally:
            _EXTRA_GRAPHS += counters["stats"]["unique_graphs"] - before - made

    def _compile(self, slot: tuple, block: torch.nn.Module, args: tuple, kwargs: dict,
                 dynamic: bool = False) -> Callable[..., Any] | None:
        """Compile the block's forward for this call (``dynamic``: for any size) and save it; called
        with the lock held."""
        import torch._dynamo.config as dynamo_config

        t0 = time.perf_counter()
        try:
            with dynamo_config.patch(enable_aot_compile=True):
                compiler = torch.compile(type(block).forward, fullgraph=True, dynamic=True if dynamic else None,
                                         options={"guard_filter_fn": _serialisable_guards})
            with _size_symbols(dynamic):
                fn = self._trace(compiler, block, args, kwargs)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self.stats.failures.append(reason)
            if dynamic:
                logger.warning("cannot precompile %s with dynamic shapes (%s); compiling one graph per size "
                               "instead", type(block).__name__, reason)
            else:
                logger.warning("cannot precompile %s (%s); compiling it with plain torch.compile (traced "
                               "again in every process)", type(block).__name__, reason)
            return None
        seconds = time.perf_counter() - t0
        self.stats.compiled += 1
        self.stats.compile_seconds += seconds
        path = self.path(slot)
        try:  # whole or not at all: another process may load it at any moment
            write_whole(path, fn.save_compiled_function)
        except Exception as exc:  # still usable in this process; the next one compiles again
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self.stats.failures.append(reason)
            logger.warning("compiled %s but could not save it to %s (%s); later processes compile it again",
                           type(block).__name__, path, reason)
        else:
            self.stats.saved += 1
            logger.info("compiled %s in %.1f s, saved to %s", type(block).__name__, seconds, path)
            prune(self.folder)
        self._functions[slot] = fn
        return fn


def _size_symbols(dynamic: bool) -> contextlib.AbstractContextManager[Any]:
    """For a trace with dynamic shapes: a size symbol of its own for every input dimension (decision 58).

    Dynamo's duck shaping gives input dimensions that are equal at trace time one symbol. When one of
    them is then fixed by the weights (the rotary tables' last dimension is the head size), the other
    is fixed with it: a graph traced while the text was as long as the head size guarded that length,
    and every later text length failed the guard and compiled a graph for its exact size. With a symbol
    per dimension only the dimension the weights fix is fixed."""
    if not dynamic:
        return contextlib.nullcontext()
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]  # added by install_config_module


def _mark_used(path: Path) -> None:
    """Record a load in the file's modification time (what :func:`prune` goes by; access times are
    often not kept). A read-only cache is left as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune(folder: Path, unused_days: float = UNUSED_DAYS) -> int:
    """Delete saved blocks not loaded or written for ``unused_days``, and temporary files a killed
    writer left (older than a day); returns how many files went. Anything that cannot be deleted
    stays. The ``first-*.json`` records of earlier versions' preload (decision 48, removed) go by the
    saved blocks' rule: nothing writes them any more."""
    now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.endswith(".bin") or (entry.name.startswith("first-") and entry.name.endswith(".json")):
            limit = unused_days * 86400
        elif is_partial(entry.name):
            limit = 86400
        else:
            continue
        try:
            if entry.is_file() and now - entry.stat().st_mtime > limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    if removed:
        logger.info("deleted %d saved compiled block file(s) unused for %g days from %s", removed,
                    unused_days, folder)
    return removed


def _EAGER(*args: Any, **kwargs: Any) -> Any:
    """Marks a slot a background worker is compiling: its blocks run uncompiled meanwhile."""
    raise AssertionError("a marker, never called")


#: Graphs Dynamo counted for traces that did not become a compiled function (restarted or failed
#: ones); see :func:`extra_graphs`.
_EXTRA_GRAPHS = 0


def extra_graphs() -> int:
    """How many of Dynamo's counted graphs (``counters["stats"]["unique_graphs"]``) were precompile
    traces that restarted or failed, so a count of compiled graphs can leave them out."""
    return _EXTRA_GRAPHS


def has_saved_blocks(folder: Path) -> bool:
    """Whether ``folder`` holds any saved block (for this model or another, of this software or not):
    without one, a process's first regional compile certainly compiles (decision 46)."""
    try:
        return any(entry.name.endswith(".bin") for entry in os.scandir(folder))
    except OSError:
        return False


def folder_for(cache_dir: Path | str) -> Path:
    """Where saved blocks live inside a compile cache folder."""
    return Path(cache_dir) / FOLDER
