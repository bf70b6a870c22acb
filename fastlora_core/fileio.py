"""Positioned reads that fill a buffer completely: the one rule the direct readers share
(:mod:`~fastlora_core.loading.direct` for checkpoints, :mod:`~fastlora_core.lora.staging` for LoRA
tensors memory-mapped by ComfyUI's loaders, :func:`read_span` for LoRA files read by the engine)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

#: Whether this platform has ``os.preadv`` (Linux and the BSDs; not Windows): many threads can read
#: one open file at their own offsets.
HAS_PREADV = hasattr(os, "preadv")


def read_exactly(path: str | Path, fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``. A short read raises ``OSError`` (the file
    was shortened); without ``os.preadv`` (Windows) each call opens a handle of its own on ``path``."""
    done = 0
    while done < len(view):
        if HAS_PREADV:
            got = os.preadv(fd, [view[done:]], offset + done)
        else:
            with open(path, "rb") as fh:
                fh.seek(offset + done)
                got = fh.readinto(view[done:]) or 0
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done:,}")
        done += got


#: Threads for :func:`read_span` (from the page cache a read is a memcpy: several cores help).
SPAN_THREADS = 8


def read_span(path: str | Path, offset: int, length: int, threads: int = SPAN_THREADS) -> torch.Tensor:
    """``length`` bytes of the file from ``offset`` in a new CPU buffer (uint8) of this process's own
    memory, read by up to ``threads`` threads at once. Unlike a memory mapping, a file rewritten or
    truncated later cannot change the result or crash the process. ``OSError`` when the file is
    shorter than asked or cannot be read."""
    buf = torch.empty(length, dtype=torch.uint8)
    if not length:
        return buf
    view = buf.numpy().data
    workers = max(1, min(threads, os.cpu_count() or 1, -(-length // 2**20)))  # at least 1 MiB each
    step = -(-length // workers)
    starts = range(0, length, step)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(partial(read_exactly, path, fd), [view[i:min(i + step, length)] for i in starts],
                          [offset + i for i in starts]))
    finally:
        os.close(fd)
    return buf
