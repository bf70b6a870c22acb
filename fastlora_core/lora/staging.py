"""Copying a LoRA's many CPU tensors to the GPU in one stream of large transfers.

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
which is always the truth. A file's tensors are placed in the order of their addresses, so a chunk is
mostly one run of the file, read with one large ``preadv`` per packing thread (:func:`_share_out`).

The chunks are allocated once per stager (2 x ``chunk_bytes`` of pinned RAM) and reused. On a
device that is not CUDA the same packing runs with ordinary memory and synchronous copies, which is
what the CPU tests check (values and shapes bit for bit).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
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


class PinnedStager:
    """Moves lists of CPU tensors to one device through two reusable pinned chunks."""

    def __init__(self, device: torch.device | str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 threads: int = PACK_THREADS, read_files: bool = HAS_PREADV) -> None:
        """``threads``: how many threads pack one chunk (1: the calling thread alone).
        ``read_files``: read memory-mapped tensors from their files (module doc)."""
        self.device = torch.device(device)
        self.read_files = read_files
        #: pieces read from files / copied from memory by the last call, in bytes (for tests and logs)
        self.last_read_bytes = self.last_copied_bytes = 0
        #: where the last call's time went, ms: ``ranges`` (file_ranges), ``pack`` (filling chunks),
        #: ``wait`` (for a chunk's transfer before refilling it, and the final one), ``total``
        self.last_ms: dict[str, float] = {}
        self.chunk_bytes = chunk_bytes
        self._chunks: list[torch.Tensor] = []
        self._done: list[torch.cuda.Event | None] = [None, None]
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fastlora-stage") if threads > 1 else None

    def _buffers(self) -> list[torch.Tensor]:
        if not self._chunks:
            pin = self.device.type == "cuda"
            self._chunks = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        return self._chunks

    def __call__(self, wanted: list[tuple[torch.Tensor, torch.dtype]]) -> list[torch.Tensor]:
        """The tensors of ``wanted`` (``(CPU tensor, target dtype)``) on the device, in that dtype,
        same shapes and values; views into one device allocation per dtype. Synchronised before it
        returns (the copies are finished)."""
        start = time.perf_counter()
        self.last_ms = {"ranges": 0.0, "pack": 0.0, "wait": 0.0}
        out: list[torch.Tensor | None] = [None] * len(wanted)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, dt) in enumerate(wanted):
            by_dtype.setdefault(dt, []).append(i)
        sources: list[FileRange | None] = [None] * len(wanted)
        readable = [i for i, (t, dt) in enumerate(wanted) if t.dtype == dt]  # no conversion due
        if self.read_files and readable:
            for i, source in zip(readable, file_ranges([wanted[i][0] for i in readable])):
                sources[i] = source
            self.last_ms["ranges"] = (time.perf_counter() - start) * 1000
        self.last_read_bytes = self.last_copied_bytes = 0
        for dt, idx in by_dtype.items():
            # In address order: a file's mapped tensors then lie in the chunks as in the file (_share_out).
            idx.sort(key=lambda i: wanted[i][0].data_ptr())
            flat = self._copy_flat([wanted[i][0] for i in idx], dt, [sources[i] for i in idx])
            pos = 0
            for i in idx:
                t = wanted[i][0]
                out[i] = flat[pos:pos + t.numel()].view(t.shape)
                pos += t.numel()
        if self.device.type == "cuda":
            waited = time.perf_counter()
            torch.cuda.current_stream(self.device).synchronize()
            self.last_ms["wait"] += (time.perf_counter() - waited) * 1000
        self.last_ms["total"] = (time.perf_counter() - start) * 1000
        return [t for t in out if t is not None]

    def _copy_flat(self, tensors: list[torch.Tensor], dtype: torch.dtype,
                   sources: list[FileRange | None]) -> torch.Tensor:
        """All ``tensors`` as one flat ``dtype`` tensor on the device (in order); ``sources``: per
        tensor, the file bytes to read it from (None: copy it from memory)."""
        cuda = self.device.type == "cuda"
        total = sum(t.numel() for t in tensors)
        dst = torch.empty(total, dtype=dtype, device=self.device)
        chunks = [c.view(dtype) for c in self._buffers()] if self.chunk_bytes % dtype.itemsize == 0 else None
        if chunks is None:  # cannot happen for the float dtypes LoRAs use; keep it correct anyway
            for t, start in zip(tensors, _starts(tensors)):
                dst[start:start + t.numel()].copy_(t.reshape(-1))
            return dst
        views = [c.numpy().data for c in self._buffers()]  # the same bytes, for preadv
        size = dtype.itemsize
        cap = chunks[0].numel()
        which, fill, sent = 0, 0, 0
        stream = torch.cuda.current_stream(self.device) if cuda else None
        files = _OpenFiles()
        pieces: list[_Piece] = []

        def fill_part(chunk: torch.Tensor, view: memoryview, part: list[_Task]) -> tuple[int, int]:
            """One thread's share of a chunk: its file reads (a failed one is copied from memory
            instead) and its memory copies. Returns (bytes read, bytes copied)."""
            read = copied = 0
            # Inference mode whatever the caller's: chunks first used under it (ComfyUI runs nodes so)
            # are inference tensors, writable only inside it; worker threads do not inherit the mode.
            with torch.inference_mode():
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
            if cuda:
                event = torch.cuda.Event()
                event.record(stream)
                self._done[which] = event
            sent += fill
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
            for k, pending in enumerate(self._done):  # both chunks free again for the next call
                if pending is not None:
                    pending.synchronize()
                    self._done[k] = None
        return dst


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
    instead of one per tensor (less Python per chunk)."""
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


def _starts(tensors: list[torch.Tensor]) -> list[int]:
    starts, pos = [], 0
    for t in tensors:
        starts.append(pos)
        pos += t.numel()
    return starts
