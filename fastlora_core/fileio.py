"""Positioned reads that fill a buffer completely: the one rule both direct readers share
(:mod:`~fastlora_core.loading.direct` for checkpoints, :mod:`~fastlora_core.lora.staging` for LoRA
tensors memory-mapped by ComfyUI's loaders)."""

from __future__ import annotations

import os
from pathlib import Path

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
