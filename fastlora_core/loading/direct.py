"""safetensors tensors read straight into device memory (docs/ARCHITECTURE.md, decision 29).

``safe_open`` and ``from_pretrained`` give CPU tensors; moving the 24 GB transformer to the GPU
afterwards costs one pageable copy per tensor on top of the read (5.2 s read + 2.6-3.4 s copies on
the H200 host). Here each tensor gets its own device allocation, the file's bytes are read by
several threads into two staging chunks (pinned on a GPU) that alternate, and each chunk goes to
the device with asynchronous copies while the next one is read: 1.0-1.2 s for 23.8 GB on the same
host (``benchmarks/bench_read.py``, RESULTS.md).

Every tensor is its own allocation, so replacing one (a layer swapped for its quantised version)
frees its memory; nothing else of the file is read. On a CPU device the same code runs with
ordinary staging memory and synchronous copies (that is how the tests drive it).

:class:`BackgroundReads` runs these reads on a thread of their own, started as soon as the headers
say what to read, so that they overlap the loader's other work: importing diffusers and
transformers, building modules on the meta device, loading tokenizers (decision 37); where the loader
still has to wait for a read, it does work handed to :func:`while_waiting` instead (decision 42).
The reading thread makes few torch calls, each a GIL round trip beside the busy loader (decision 50).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..fileio import read_exactly
from .header import Header

logger = logging.getLogger(__name__)

#: Bytes per staging chunk; two alternate (measured: 256 MB, 8 threads: 1.04-1.22 s for 23.8 GB).
CHUNK_BYTES = 256 * 2**20
#: Threads reading one chunk in parallel (page cache -> staging memory is memcpy bound).
MAX_THREADS = 8
#: Unread bytes between two wanted tensors below this are read through (one run, fewer syscalls).
GAP_BYTES = 2**20


def _runs(header: Header, names: list[str]) -> list[tuple[int, int, list[str]]]:
    """Wanted tensors (sorted by offset, non-empty) grouped into byte runs read in one go."""
    runs: list[tuple[int, int, list[str]]] = []
    for k in names:
        a, b = header.tensors[k].offsets
        if runs and a - runs[-1][1] <= GAP_BYTES:
            start, stop, members = runs[-1]
            runs[-1] = (start, max(stop, b), [*members, k])
        else:
            runs.append((a, b, [k]))
    return runs


class ReadCancelled(Exception):
    """A read stopped by :meth:`BackgroundReads.close` before it finished (its tensors are dropped)."""


class Staging:
    """The two staging chunks a reader alternates between (pinned on a GPU), and the CUDA events that
    say when the copies out of each are done. :class:`BackgroundReads` keeps one for all its files:
    allocating and pinning two 256 MB chunks per file cost 0.11-0.16 s of a warm start's reading thread
    over five files (py-spy, H100, 2026-12-06)."""

    def __init__(self, device: torch.device) -> None:
        self.pin = device.type == "cuda"
        self.buffers: list[torch.Tensor] = []
        self.views: list[Any] = []
        self.free_again: list[Any] = [None, None]  # CUDA events: the copies out of each chunk are done

    def reserve(self, chunk_bytes: int) -> int:
        """Chunks of at least ``chunk_bytes`` (grown when smaller); returns their size."""
        if not self.buffers or self.buffers[0].numel() < chunk_bytes:
            self.wait_copies()
            self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self.pin) for _ in range(2)]
            self.views = [b.numpy().data for b in self.buffers]
        return self.buffers[0].numel()

    def wait_copies(self, which: int | None = None) -> None:
        """Block until the copies out of chunk ``which`` (both when None) are done."""
        for i in (0, 1) if which is None else (which,):
            if self.free_again[i] is not None:
                self.free_again[i].synchronize()
                self.free_again[i] = None


def read_tensors(header: Header, names: Iterable[str], device: torch.device | str, *, role: str = "model",
                 chunk_bytes: int = CHUNK_BYTES, threads: int | None = None,
                 stop: threading.Event | None = None,
                 on_disk: Callable[[], object] | None = None, as_bytes: bool = False,
                 staging: Staging | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of the file described by ``header``, each in its own allocation on ``device``
    with the dtype and shape the header gives (bitwise the file's bytes).

    ``header`` comes from :func:`~fastlora_core.loading.header.read_header`, which already checked
    that every tensor lies inside the file. Raises :class:`ModelLoadError` naming the file when it
    cannot be read (I/O error, file shortened since); ``torch.OutOfMemoryError`` passes through.
    ``stop``: checked before each chunk; once set, :class:`ReadCancelled` is raised. ``on_disk``: called
    when the file's first :data:`DISK_PROBE_BYTES` arrive slower than :data:`DISK_BOUND_GBPS` (the
    bytes come from the disk, not the page cache). ``as_bytes``: each tensor as its flat uint8 bytes,
    for :func:`typed` to finish on another thread (:class:`BackgroundReads`). ``staging``: chunks kept
    from an earlier file (else two are allocated for this one).

    The next chunk's reads are under way while this one's pieces go to the device (decision 53): the
    copies' torch calls, each a GIL round trip beside a busy loader, no longer stop the reading.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    info = header.tensors
    wanted = sorted(set(names), key=lambda k: info[k].offsets)
    raw = {k: torch.empty(info[k].offsets[1] - info[k].offsets[0], dtype=torch.uint8, device=device) for k in wanted}
    runs = _runs(header, [k for k in wanted if info[k].offsets[1] > info[k].offsets[0]])
    staging = staging or Staging(device)
    chunk_bytes = staging.reserve(max(1, min(chunk_bytes, max((b - a for a, b, _ in runs), default=1))))
    # (start, size, run index) of every chunk, in file order
    chunks = [(pos, min(chunk_bytes, end - pos), r) for r, (start, end, _) in enumerate(runs)
              for pos in range(start, end, chunk_bytes)]
    workers = max(1, min(threads or MAX_THREADS, os.cpu_count() or 1))
    t0, total = time.perf_counter(), 0
    try:
        fd = os.open(header.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ModelLoadError(f"The {role} file {header.path} could not be opened ({e}). Check the path and its "
                             "permissions.") from e
    try:
        read = partial(read_exactly, header.path, fd)
        with ThreadPoolExecutor(workers) as pool:

            def start_reading(i: int) -> list[Any]:
                """Chunk ``i``'s parts, read into staging chunk ``i % 2`` once the copies out of it are done."""
                pos, n, _ = chunks[i]
                staging.wait_copies(i % 2)
                step, view = -(-n // workers), staging.views[i % 2]
                return [pool.submit(read, view[j:min(j + step, n)], header.data_start + pos + j)
                        for j in range(0, n, step)]

            first = [0] * len(runs)  # per run: its members before this index are completely copied
            parts = start_reading(0) if chunks else []
            for i, (pos, n, r) in enumerate(chunks):
                if stop is not None and stop.is_set():
                    raise ReadCancelled(str(header.path))
                wait(parts)  # one wake-up for the chunk, not one per part
                for part in parts:
                    part.result()  # a part's OSError surfaces here
                parts = start_reading(i + 1) if i + 1 < len(chunks) else []
                total += n
                if on_disk is not None and total >= DISK_PROBE_BYTES > total - n:
                    if total / (time.perf_counter() - t0) < DISK_BOUND_GBPS * 1e9:
                        on_disk()
                members, dst, src = runs[r][2], [], []
                for name in members[first[r]:]:
                    a, b = info[name].offsets
                    if a >= pos + n:
                        break
                    lo, hi = max(a, pos), min(b, pos + n)
                    if lo < hi:
                        dst.append(raw[name] if (lo, hi) == (a, b) else raw[name][lo - a:hi - a])
                        src.append(staging.buffers[i % 2][lo - pos:hi - pos])
                    if b <= pos + n:
                        first[r] += 1
                if dst:  # one call for the chunk's pieces: each torch call here is a GIL round trip (decision 50)
                    torch._foreach_copy_(dst, src, non_blocking=cuda)
                if cuda:
                    staging.free_again[i % 2] = event = torch.cuda.Event()
                    event.record()
        if cuda:
            torch.cuda.synchronize(device)
    except OSError as e:
        raise ModelLoadError(f"The {role} file {header.path} could not be read ({e}). Check the disk, or "
                             "download the file again.") from e
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    logger.info("%s: read %.2f GB straight to %s in %.2f s", header.path.name, total / 1e9, device, seconds)
    return raw if as_bytes else typed(header, raw)


def typed(header: Header, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor's bytes (``read_tensors(..., as_bytes=True)``) as the dtype and shape its header
    says. Two torch calls per tensor, which :class:`BackgroundReads` leaves to the thread that takes
    the result: on a thread of its own each torch call waits to take the GIL back from the importing
    loader, 0.8 s for a Flux transformer's ~1000 tensors (py-spy, H100, 2026-12-06)."""
    info = header.tensors
    return {k: t.view(info[k].torch_dtype).view(info[k].shape) for k, t in raw.items()}


#: Whether the loaders start their direct reads in the background (:class:`BackgroundReads`); the
#: start-up benchmark turns it off for a same-call comparison.
BACKGROUND = True

#: Whether :meth:`BackgroundReads.take` does the work handed to :func:`while_waiting` while a read is
#: still under way; the start-up benchmark turns it off for a same-call comparison.
IDLE_WORK = True
_idle: list[Callable[[], object]] = []
_idle_lock = threading.Lock()

#: A read whose first ``DISK_PROBE_BYTES`` come slower than this many GB/s reads from the disk: the
#: page cache gave 8-12 GB/s on the H100/H200 hosts, their disks 1.7-2.1 GB/s (2026-12-06). Then the
#: loader's thread is mostly blocked on the disk too and never waits for a read (a disk-cold start:
#: no idle work ran at all), so a thread of its own does the idle work meanwhile (decision 49).
DISK_BOUND_GBPS = 4.0
DISK_PROBE_BYTES = 2**30


@contextlib.contextmanager
def while_waiting(*tasks: Callable[[], object]) -> Iterator[None]:
    """Work the loading thread may do, each task once, instead of blocking on a background read
    that is not finished (decision 42): imports that a later step needs anyway, such as the
    compiler's, whose first use would otherwise stand on the first image's path. When a read comes
    from the disk, a thread of :class:`BackgroundReads` also takes tasks from this list (decision 49).
    A task that fails is logged and left to its later step. Tasks not run by the end of the block are
    dropped."""
    with _idle_lock:
        _idle.extend(tasks)
    try:
        yield
    finally:
        with _idle_lock:
            for task in tasks:
                if task in _idle:
                    _idle.remove(task)


def _next_idle_task() -> Callable[[], object] | None:
    with _idle_lock:
        return _idle.pop(0) if _idle else None


def _do_idle_work(until: threading.Event) -> None:
    while IDLE_WORK and not until.is_set() and (task := _next_idle_task()) is not None:
        t0 = time.perf_counter()
        try:
            task()
        except Exception as exc:  # noqa: BLE001 - its later step does it again and reports
            logger.info("work while waiting for a read failed (%s: %s); done later", type(exc).__name__, exc)
        logger.info("%s while waiting for a read: %.2f s", getattr(task, "__name__", task), time.perf_counter() - t0)


#: Python's thread switch interval while background reads run. The reading threads need the GIL
#: briefly a few thousand times (each chunk's reads and copies, each tensor's allocation) while the
#: loader's thread imports modules, which holds it for long stretches: at the default 5 ms each
#: hand-over could wait that long (decision 50 keeps their number down). Restored when the reads are
#: closed.
SWITCH_INTERVAL_S = 0.0005


class BackgroundReads:
    """Files read straight to the device (:func:`read_tensors`) on a thread of their own, in the order
    given, while the caller goes on (decision 37). :meth:`take` waits for one file's tensors and
    hands them over; :meth:`close` (or leaving the ``with`` block) stops what is left, waits for the
    thread and drops every tensor not taken, so a load that fails half-way leaves nothing behind.

    The thread runs in the caller's inference mode and on the device's CUDA context. A read's error
    (``ModelLoadError`` naming the file, ``torch.OutOfMemoryError``) is raised by :meth:`take`.
    """

    def __init__(self, jobs: Sequence[tuple[Header, Sequence[str], str]], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._jobs = {job[0].path: job for job in jobs}
        self._done = {path: threading.Event() for path in self._jobs}
        self._results: dict[Path, dict[str, torch.Tensor] | BaseException] = {}  # bytes, typed by take()
        self._stop = threading.Event()
        self._finished = threading.Event()  # every read done, failed or stopped
        self._idle_thread: threading.Thread | None = None  # decision 49's, once a read is seen to be slow
        self._inference = torch.is_inference_mode_enabled()
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="fastlora-read", daemon=True)
        self._thread.start()

    def _from_disk(self) -> None:
        """Decision 49: a read turned out to come from the disk, so the loader's thread, blocked on the
        disk itself, may never wait for one: start a thread that does the idle work until the reads are
        over (once; called by the reading thread)."""
        if self._idle_thread is None and IDLE_WORK:
            logger.info("the weights come from the disk: the idle work runs beside the loader")
            self._idle_thread = threading.Thread(target=self._idle_work, name="fastlora-idle", daemon=True)
            self._idle_thread.start()

    def _idle_work(self) -> None:
        """The idle list until the reads are over. A task still running then finishes here (each is
        safe to run beside its later step)."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.inference_mode(self._inference):
            _do_idle_work(until=self._finished)

    def _run(self) -> None:
        pending = list(self._jobs.items())
        done = dict(self._done)  # take() forgets a file's event once handed over
        staging = Staging(self.device)  # one pair of chunks for every file (freed when the reads end)
        try:
            on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with on_device, torch.inference_mode(self._inference):
                while pending:
                    path, (header, names, role) = pending[0]
                    if self._stop.is_set():
                        raise ReadCancelled(str(path))
                    self._results[path] = read_tensors(header, names, self.device, role=role, stop=self._stop,
                                                       on_disk=self._from_disk, as_bytes=True, staging=staging)
                    done[path].set()
                    pending.pop(0)
        except BaseException as e:  # noqa: BLE001 - handed to take(), which raises it in the caller
            for path, _ in pending:  # this file's error; the files after it were never read
                self._results[path] = e
                done[path].set()
        finally:
            self._finished.set()

    def planned(self, header: Header, names: Iterable[str]) -> bool:
        """Whether exactly these tensors of this file are being read here (and not taken yet)."""
        job = self._jobs.get(header.path)
        return job is not None and header.path in self._done and sorted(job[1]) == sorted(names)

    def take(self, header: Header, names: Iterable[str], role: str = "model") -> dict[str, torch.Tensor]:
        """The tensors of ``header``'s file once read (as :func:`read_tensors` returns them); read here
        and now (naming the file as ``role``) when that file and those names were not planned."""
        names = list(names)
        if not self.planned(header, names):
            return read_tensors(header, names, self.device, role=role)
        done = self._done.pop(header.path)
        _do_idle_work(until=done)
        done.wait()
        result = self._results.pop(header.path)
        if isinstance(result, BaseException):
            raise result
        return typed(header, result)

    def close(self) -> None:
        """Stop the reads not finished, wait for the thread, drop what was not taken; restores the
        switch interval. Safe to call twice."""
        self._stop.set()
        self._thread.join()
        self._results.clear()
        self._done.clear()
        sys.setswitchinterval(self._interval)

    def __enter__(self) -> BackgroundReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
