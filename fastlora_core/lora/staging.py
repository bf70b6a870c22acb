"""Copying a LoRA's many CPU tensors to the GPU in one stream of large transfers.

A rank-64 Flux LoRA is ~840 tensors of 0.4-1.5 MB (~520 MB). Copied one ``tensor.to("cuda")`` at a
time from pageable memory, each copy is synchronous and goes through the driver's own small bounce
buffer. :class:`PinnedStager` instead packs the tensors (converted to their target dtype on the way)
into two reusable page-locked chunks and sends each full chunk with one asynchronous copy into a
single device buffer, so packing the next chunk overlaps the transfer of the previous one; the
results are views of that buffer (one device allocation per LoRA instead of ~840).

Packing a chunk is split over a few threads (``torch`` copies release the GIL): the tensors ComfyUI's
LoRA loaders hand over are memory-mapped from the file, so packing is where their pages are first
read, and page faults served by several threads at once come in several times faster than by one.

The chunks are allocated once per stager (2 x ``chunk_bytes`` of pinned RAM) and reused. On a
device that is not CUDA the same packing runs with ordinary memory and synchronous copies, which is
what the CPU tests check (values and shapes bit for bit).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 2**20
#: threads that pack one chunk (at most; 1 on a machine with fewer cores)
PACK_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


class PinnedStager:
    """Moves lists of CPU tensors to one device through two reusable pinned chunks."""

    def __init__(self, device: torch.device | str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 threads: int = PACK_THREADS) -> None:
        """``threads``: how many threads pack one chunk (1: the calling thread alone)."""
        self.device = torch.device(device)
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
        out: list[torch.Tensor | None] = [None] * len(wanted)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (_, dt) in enumerate(wanted):
            by_dtype.setdefault(dt, []).append(i)
        for dt, idx in by_dtype.items():
            flat = self._copy_flat([wanted[i][0] for i in idx], dt)
            pos = 0
            for i in idx:
                t = wanted[i][0]
                out[i] = flat[pos:pos + t.numel()].view(t.shape)
                pos += t.numel()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return [t for t in out if t is not None]

    def _copy_flat(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """All ``tensors`` as one flat ``dtype`` tensor on the device (in order)."""
        cuda = self.device.type == "cuda"
        total = sum(t.numel() for t in tensors)
        dst = torch.empty(total, dtype=dtype, device=self.device)
        chunks = [c.view(dtype) for c in self._buffers()] if self.chunk_bytes % dtype.itemsize == 0 else None
        if chunks is None:  # cannot happen for the float dtypes LoRAs use; keep it correct anyway
            for t, start in zip(tensors, _starts(tensors)):
                dst[start:start + t.numel()].copy_(t.reshape(-1))
            return dst
        cap = chunks[0].numel()
        which, fill, sent = 0, 0, 0
        stream = torch.cuda.current_stream(self.device) if cuda else None
        pieces: list[tuple[torch.Tensor, int]] = []  # (source slice, offset in the current chunk)

        def copy(chunk: torch.Tensor, run: list[tuple[torch.Tensor, int]]) -> None:
            # Inference mode whatever the caller's: chunks first used under it (ComfyUI runs nodes so)
            # are inference tensors, writable only inside it; worker threads do not inherit the mode.
            with torch.inference_mode():
                for src, at in run:
                    chunk[at:at + src.numel()].copy_(src)

        def pack() -> None:
            if self._pool is None or len(pieces) < 2:
                copy(chunks[which], pieces)
            else:  # contiguous runs of pieces, about the same bytes each, one per thread
                share = -(-fill // self.threads)
                runs: list[list[tuple[torch.Tensor, int]]] = [[]]
                for piece in pieces:
                    if runs[-1] and piece[1] >= share * len(runs):
                        runs.append([])
                    runs[-1].append(piece)
                for done in [self._pool.submit(copy, chunks[which], run) for run in runs]:
                    done.result()
            pieces.clear()

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
                pending.synchronize()
                self._done[which] = None

        for t in tensors:
            src = t.reshape(-1)
            i = 0
            while i < src.numel():
                n = min(cap - fill, src.numel() - i)
                pieces.append((src[i:i + n], fill))
                fill += n
                i += n
                if fill == cap:
                    flush()
        flush()
        for k, pending in enumerate(self._done):  # both chunks free again for the next call
            if pending is not None:
                pending.synchronize()
                self._done[k] = None
        return dst


def _starts(tensors: list[torch.Tensor]) -> list[int]:
    starts, pos = [], 0
    for t in tensors:
        starts.append(pos)
        pos += t.numel()
    return starts
