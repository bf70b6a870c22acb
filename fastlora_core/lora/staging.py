"""Copying a LoRA's many CPU tensors to the GPU in one stream of large transfers, while the swap
that needs them is already running.

A rank-64 Flux LoRA is ~840 tensors of 0.4-1.5 MB (~520 MB). Copied one ``tensor.to("cuda")`` at a
time from pageable memory, each copy is synchronous and goes through the driver's own small bounce
buffer. :class:`PinnedStager` instead packs the tensors (converted to their target dtype on the way)
into two reusable page-locked chunks and sends each full chunk with one asynchronous copy into a
single device buffer, so packing the next chunk overlaps the transfer of the previous one; the
results are views of that buffer (one device allocation per LoRA instead of ~840).

Packing a chunk is split over a few threads (``torch`` copies and ``preadv`` release the GIL). The
tensors ComfyUI's LoRA loaders hand over are memory-mapped from the file and nothing has touched their
pages yet: where :func:`~.mapped.file_ranges` says a tensor still holds its file's bytes unchanged (and
no dtype conversion is due), its piece of the chunk is read from the file with ``preadv`` (page cache
-> pinned memory, no page faults; ARCHITECTURE decision 30); anything else is copied from memory,
which is always the truth.

:meth:`PinnedStager.start` returns at once (ARCHITECTURE decision 33): the device tensors exist
(allocated, not yet filled) and one background thread packs and sends the chunks on a side CUDA
stream, recording an event after each. :meth:`StagingJob.ready` makes the caller's stream wait for
the chunks that hold some tensors, so a swap merges the first layers while the last ones are still
being read (:class:`Arrivals` gathers the jobs of one swap). Jobs run one at a time, in order.

The chunks are allocated once per stager (2 x ``chunk_bytes`` of pinned RAM) and reused. On a
device that is not CUDA the same packing runs with ordinary memory and synchronous copies, which is
what the CPU tests check (values and shapes bit for bit, and what ``ready`` waits for).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

from ..fileio import HAS_PREADV, read_exactly
from .mapped import FileRange, file_ranges

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 2**20
#: threads that pack one chunk (at most; 1 on a machine with fewer cores)
PACK_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))

#: One piece of a chunk: the source slice, its offset in the chunk (elements), and where to read it
#: from instead of copying it: (file, open descriptor, byte offset), or None.
_Piece = tuple[torch.Tensor, int, tuple[FileRange, int, int] | None]


class StagingJob:
    """One :meth:`PinnedStager.start`: the device tensors (all allocated, filled chunk by chunk by the
    stager's thread) and what has arrived so far.

    Positions are bytes of the job in the order it sends them; a tensor is there once everything up
    to its end position has been sent (a chunk's copy enqueued on the side stream, its event recorded).
    """

    def __init__(self, device: torch.device, tensors: list[torch.Tensor], ends: dict[int, int]) -> None:
        self.device = device
        #: the staged tensors, in the order they were asked for (their values arrive over time)
        self.tensors = tensors
        self._ends = ends  # id(staged tensor) -> its end position
        self._cond = threading.Condition()
        self._sent: list[tuple[int, torch.cuda.Event | None]] = []  # (position sent up to, its event)
        self._waited = 0  # the caller's stream already waits for everything up to here
        self._error: BaseException | None = None
        self._future: Future[None] | None = None
        #: milliseconds from start to the last copy's end (0 while running)
        self.ms = 0.0

    def position(self, tensors: Iterable[torch.Tensor]) -> int:
        """Where the last of ``tensors`` ends in this job's order; -1 when none is this job's."""
        return max((self._ends.get(id(t), -1) for t in tensors), default=-1)

    def ready(self, tensors: Iterable[torch.Tensor]) -> None:
        """Make the current stream wait until this job's copies of ``tensors`` are on the device
        (blocks the caller only until those copies are enqueued). Tensors of other jobs are ignored.
        Raises what stopped the stager."""
        need = self.position(tensors)
        if need < 0 or need <= self._waited:
            return
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                found = next(((upto, ev) for upto, ev in self._sent if upto >= need), None)
                if found is not None:
                    break
                if self._future is not None and self._future.done():  # ended without sending it
                    raise RuntimeError(f"staging ended before position {need} was sent")
                self._cond.wait(timeout=1.0)
        upto, event = found
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self._waited = upto

    def result(self) -> list[torch.Tensor]:
        """The staged tensors once every copy is over (waits for the stager's thread); raises what
        stopped it."""
        if self._future is not None:
            self._future.result()
        if self._error is not None:
            raise self._error
        return self.tensors

    def finished(self) -> None:
        """Wait for the stager's thread to be done with this job, whatever the outcome."""
        if self._future is not None:
            self._future.exception()

    # -- the stager's side ------------------------------------------------------------------------
    def _arrived(self, upto: int, event: torch.cuda.Event | None) -> None:
        with self._cond:
            self._sent.append((upto, event))
            self._cond.notify_all()

    def _failed(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()


class Arrivals:
    """The LoRA tensors of one swap that are still on their way (the jobs started for its new LoRAs),
    as a swap strategy sees them: :meth:`order` to take layers in the order they arrive, :meth:`ready`
    before reading a layer's tensors, :meth:`finish` before calling the swap done. ``on_arrived`` runs
    in :meth:`finish` once everything is there (the engine's NaN / infinity check of new LoRAs); what
    it raises fails the swap like any error."""

    def __init__(self, jobs: Sequence[StagingJob] = (), on_arrived: Callable[[], None] | None = None) -> None:
        self.jobs = list(jobs)
        self._on_arrived = on_arrived
        self._finished = not self.jobs and on_arrived is None

    def order(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
        """Sort key: (job, position) of the last of ``tensors`` to arrive; (-1, -1) when all are there."""
        for i in range(len(self.jobs) - 1, -1, -1):
            at = self.jobs[i].position(tensors)
            if at >= 0:
                return i, at
        return -1, -1

    def ready(self, tensors: Sequence[torch.Tensor]) -> None:
        for job in self.jobs:
            job.ready(tensors)

    def finish(self) -> None:
        """Wait for every job, then run ``on_arrived`` (once)."""
        if self._finished:
            return
        for job in self.jobs:
            job.result()
        if self._on_arrived is not None:
            self._on_arrived()
        self._finished = True

    def abandon(self) -> None:
        """A failed swap: wait until no job writes any more (their errors are the caller's to log)."""
        for job in self.jobs:
            job.finished()

    @property
    def ms(self) -> float:
        """The jobs' staging time, ms (each from its start to its last copy's end)."""
        return sum(job.ms for job in self.jobs)


class PinnedStager:
    """Moves lists of CPU tensors to one device through two reusable pinned chunks."""

    def __init__(self, device: torch.device | str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 threads: int = PACK_THREADS, read_files: bool = HAS_PREADV) -> None:
        """``threads``: how many threads pack one chunk (1: the stager's thread alone).
        ``read_files``: read memory-mapped tensors from their files (module doc)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the stager's thread sets it explicitly
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.read_files = read_files
        #: pieces read from files / copied from memory by the last job, in bytes (for tests and logs)
        self.last_read_bytes = self.last_copied_bytes = 0
        #: where the last job's time went, ms: ``ranges`` (file_ranges), ``pack`` (filling chunks),
        #: ``wait`` (for a chunk's transfer before refilling it, and the final one), ``total``
        self.last_ms: dict[str, float] = {}
        self.chunk_bytes = chunk_bytes
        self._chunks: list[torch.Tensor] = []
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._stream: torch.cuda.Stream | None = None
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fastlora-pack") if threads > 1 else None
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="fastlora-stage")

    def __call__(self, wanted: list[tuple[torch.Tensor, torch.dtype]]) -> list[torch.Tensor]:
        """The tensors of ``wanted`` (``(CPU tensor, target dtype)``) on the device, in that dtype,
        same shapes and values; views into one device allocation per dtype. Every copy is over when
        it returns."""
        return self.start(wanted).result()

    def start(self, wanted: list[tuple[torch.Tensor, torch.dtype]]) -> StagingJob:
        """Start staging ``wanted`` (as :meth:`__call__`) and return at once: the job's tensors are
        allocated, and filled by the stager's thread (:class:`StagingJob`)."""
        out: list[torch.Tensor | None] = [None] * len(wanted)
        ends: dict[int, int] = {}
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, dt) in enumerate(wanted):
            by_dtype.setdefault(dt, []).append(i)
        groups: list[tuple[torch.dtype, list[int], torch.Tensor]] = []
        done_bytes = 0
        for dt, idx in by_dtype.items():
            # In address order: a file's mapped tensors then lie in the chunks as in the file (_share_out).
            idx.sort(key=lambda i: wanted[i][0].data_ptr())
            flat = torch.empty(sum(wanted[i][0].numel() for i in idx), dtype=dt, device=self.device)
            pos = 0
            for i in idx:
                t = wanted[i][0]
                view = flat[pos:pos + t.numel()].view(t.shape)
                out[i] = view
                pos += t.numel()
                ends[id(view)] = done_bytes + pos * dt.itemsize
            done_bytes += flat.numel() * dt.itemsize
            groups.append((dt, idx, flat))
        job = StagingJob(self.device, [t for t in out if t is not None], ends)
        job._future = self._runner.submit(self._run, job, wanted, groups, time.perf_counter())
        return job

    # -- the stager's thread ----------------------------------------------------------------------
    def _run(self, job: StagingJob, wanted: list[tuple[torch.Tensor, torch.dtype]],
             groups: list[tuple[torch.dtype, list[int], torch.Tensor]], start: float) -> None:
        cuda = self.device.type == "cuda"
        try:
            # Inference mode whatever the caller's: tensors made under it (ComfyUI runs nodes so) are
            # inference tensors, writable only inside it; threads do not inherit the mode.
            with torch.inference_mode():
                if cuda:
                    torch.cuda.set_device(self.device)
                    if self._stream is None:
                        self._stream = torch.cuda.Stream(self.device)
                    with torch.cuda.stream(self._stream):
                        self._send(job, wanted, groups, start)
                else:
                    self._send(job, wanted, groups, start)
        except BaseException as exc:
            job._failed(exc)
            raise
        finally:
            job.ms = (time.perf_counter() - start) * 1000

    def _send(self, job: StagingJob, wanted: list[tuple[torch.Tensor, torch.dtype]],
              groups: list[tuple[torch.dtype, list[int], torch.Tensor]], start: float) -> None:
        self.last_ms = {"ranges": 0.0, "pack": 0.0, "wait": 0.0}
        sources: list[FileRange | None] = [None] * len(wanted)
        readable = [i for i, (t, dt) in enumerate(wanted) if t.dtype == dt]  # no conversion due
        if self.read_files and readable:
            for i, source in zip(readable, file_ranges([wanted[i][0] for i in readable])):
                sources[i] = source
            self.last_ms["ranges"] = (time.perf_counter() - start) * 1000
        self.last_read_bytes = self.last_copied_bytes = 0
        sent = 0
        for dt, idx, flat in groups:
            self._copy_flat(job, sent, flat, [wanted[i][0] for i in idx], [sources[i] for i in idx])
            sent += flat.numel() * dt.itemsize
        self.last_ms["total"] = (time.perf_counter() - start) * 1000
        logger.debug("staged %d tensors: %.1f MB read from their files, %.1f MB copied from memory; ms %s",
                     len(wanted), self.last_read_bytes / 1e6, self.last_copied_bytes / 1e6,
                     {k: round(v, 1) for k, v in self.last_ms.items()})

    def _buffers(self) -> list[torch.Tensor]:
        if not self._chunks:
            pin = self.device.type == "cuda"
            self._chunks = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        return self._chunks

    def _copy_flat(self, job: StagingJob, before: int, dst: torch.Tensor, tensors: list[torch.Tensor],
                   sources: list[FileRange | None]) -> None:
        """Fill ``dst`` (flat, on the device) with ``tensors`` in order, telling ``job`` what has been
        sent (``before``: its position where ``dst`` starts); ``sources``: per tensor, the file
        bytes to read it from (None: copy it from memory)."""
        cuda = self.device.type == "cuda"
        dtype = dst.dtype
        size = dtype.itemsize
        if self.chunk_bytes % size:  # cannot happen for the float dtypes LoRAs use; keep it correct anyway
            pos = 0
            for t in tensors:
                dst[pos:pos + t.numel()].copy_(t.reshape(-1))
                pos += t.numel()
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
                event.synchronize()
            job._arrived(before + dst.numel() * size, event)
            return
        chunks = [c.view(dtype) for c in self._buffers()]
        views = [c.numpy().data for c in self._buffers()]  # the same bytes, for preadv
        cap = chunks[0].numel()
        which, fill, sent = 0, 0, 0
        files = _OpenFiles()
        pieces: list[_Piece] = []

        def fill_part(chunk: torch.Tensor, view: memoryview, part: list[_Task]) -> tuple[int, int]:
            """One thread's share of a chunk: its file reads (a failed one is copied from memory
            instead) and its memory copies. Returns (bytes read, bytes copied)."""
            read = copied = 0
            with torch.inference_mode():  # chunks are inference tensors (made in the stager's thread)
                for task in part:
                    if isinstance(task, _Read):
                        try:
                            read_exactly(task.path, task.fd, view[task.at * size:(task.at + task.n) * size], task.offset)
                            read += task.n * size
                            continue
                        except OSError as exc:  # the file changed under the mapping: memory is the truth
                            logger.debug("%s: reading %d bytes failed (%s); copying from memory", task.path,
                                         task.n * size, exc)
                        for src, at, _ in pieces:  # the pieces this read was to fill
                            lo, hi = max(task.at, at), min(task.at + task.n, at + src.numel())
                            if lo < hi:
                                chunk[lo:hi].copy_(src[lo - at:hi - at])
                                copied += (hi - lo) * size
                    else:
                        src, at = task
                        chunk[at:at + src.numel()].copy_(src)
                        copied += src.numel() * size
            return read, copied

        def pack() -> None:
            packing = time.perf_counter()
            parts = _share_out(pieces, fill, self.threads if self._pool is not None else 1, size)
            if self._pool is None or len(parts) < 2:
                counts = [fill_part(chunks[which], views[which], part) for part in parts]
            else:
                counts = [done.result() for done in [self._pool.submit(fill_part, chunks[which], views[which], part)
                                                     for part in parts]]
            self.last_read_bytes += sum(r for r, _ in counts)
            self.last_copied_bytes += sum(c for _, c in counts)
            pieces.clear()
            self.last_ms["pack"] += (time.perf_counter() - packing) * 1000

        def flush() -> None:
            nonlocal which, fill, sent
            if fill == 0:
                return
            pack()
            dst[sent:sent + fill].copy_(chunks[which][:fill], non_blocking=cuda)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
                self._done[which] = event
            sent += fill
            job._arrived(before + sent * size, event)
            fill = 0
            which ^= 1
            pending = self._done[which]
            if pending is not None:  # the other chunk's transfer must be over before it is refilled
                waited = time.perf_counter()
                pending.synchronize()
                self.last_ms["wait"] += (time.perf_counter() - waited) * 1000
                self._done[which] = None

        try:
            for t, source in zip(tensors, sources):
                src = t.reshape(-1)
                fd = files.open(source) if source is not None else None
                i = 0
                while i < src.numel():
                    n = min(cap - fill, src.numel() - i)
                    where = (source, fd, source.offset + i * size) if source is not None and fd is not None else None
                    pieces.append((src[i:i + n], fill, where))
                    fill += n
                    i += n
                    if fill == cap:
                        flush()
            flush()
        finally:
            files.close()
            waited = time.perf_counter()
            for k, pending in enumerate(self._done):  # both chunks free again, every copy over
                if pending is not None:
                    pending.synchronize()
                    self._done[k] = None
            self.last_ms["wait"] += (time.perf_counter() - waited) * 1000


class _Read(NamedTuple):
    """A positioned read into a chunk: ``n`` elements at chunk element ``at`` from byte ``offset``."""

    path: str
    fd: int
    offset: int
    at: int
    n: int


#: What one packing thread does for a chunk: a read from a file, or a copy ``(source slice, at)``.
_Task = _Read | tuple[torch.Tensor, int]


def _share_out(pieces: list[_Piece], fill: int, threads: int, size: int) -> list[list[_Task]]:
    """Split a chunk's pieces into at most ``threads`` lists of tasks of about ``fill / threads``
    elements each, by chunk position. Pieces read from one file at consecutive offsets into
    consecutive chunk positions become one read (the stager places a file's tensors in the order of
    their addresses, so a chunk is mostly one run of the file): a few large ``preadv`` per chunk
    instead of one per tensor, which also leaves the GIL to the swap running beside the stager."""
    share = -(-fill // threads)
    parts: list[list[_Task]] = [[] for _ in range(threads)]
    run: _Read | None = None
    runs: list[_Read] = []
    for src, at, where in pieces:
        if where is None:
            parts[min(at // share, threads - 1)].append((src, at))
            continue
        file, fd, offset = where
        if run is not None and run.fd == fd and run.offset + run.n * size == offset and run.at + run.n == at:
            run = runs[-1] = run._replace(n=run.n + src.numel())
        else:
            run = _Read(file.path, fd, offset, at, src.numel())
            runs.append(run)
    for r in runs:  # cut at the share boundaries, each part to its thread
        offset, at, n = r.offset, r.at, r.n
        while n:
            t = min(at // share, threads - 1)
            cut = n if t == threads - 1 else min(n, (t + 1) * share - at)
            parts[t].append(_Read(r.path, r.fd, offset, at, cut))
            offset, at, n = offset + cut * size, at + cut, n - cut
    return [part for part in parts if part]


class _OpenFiles:
    """Read-only descriptors of the files mapped tensors come from, opened once per staging call.
    A path that no longer names the file that was mapped (replaced since: other device or inode)
    gets None, and its tensors are copied from memory."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int, int], int | None] = {}

    def open(self, source: FileRange) -> int | None:
        key = (source.path, source.dev, source.inode)
        if key not in self._fds:
            fd: int | None = None
            try:
                fd = os.open(source.path, os.O_RDONLY)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (source.dev, source.inode):
                    os.close(fd)
                    fd = None
            except OSError:
                fd = None
            self._fds[key] = fd
        return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

