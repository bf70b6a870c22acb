"""Which file, and which bytes of it, a memory-mapped CPU tensor holds.

ComfyUI's LoRA loaders read the file with ``safetensors.safe_open`` every time the node runs: each run
gives new tensor objects, whose bytes are a private (copy-on-write) memory map of the file. When a
user goes back to a LoRA file used a minute ago, FastLoRA should recognise the LoRA it has already
converted and staged on the GPU instead of reading its pages (~500 MB for a rank-64 Flux LoRA) again.
:func:`tensor_sources` says, per tensor, ``(file identity, byte offset, byte length, dtype, shape)``:
equal sources mean equal values.

It answers None wherever that cannot be said for sure, and the caller then falls back to object
identity: not Linux (it reads ``/proc/self/maps`` and ``/proc/self/pagemap``), a tensor that is not a
contiguous view of one mapped file, a file replaced or deleted since it was mapped (its inode
differs), or a tensor written in place since it was read (its version counter moved, or one of its
pages is no longer the file's page but a private copy).
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .cache import FileKey, file_key

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# /proc/self/pagemap, one 64-bit entry per page: bit 63 present, bit 62 swapped, bit 61 file-backed.
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61


class Source(NamedTuple):
    """Where a tensor's bytes come from; equal sources hold equal values."""

    file: FileKey
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class _Mapping(NamedTuple):
    start: int
    end: int
    offset: int
    inode: int
    path: str


def _file_mappings() -> list[_Mapping]:
    """This process's memory maps of regular files, sorted by start address."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[4] == "0":
                continue
            path = parts[5].rstrip("\n")
            if not path.startswith("/") or path.endswith(" (deleted)"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append(_Mapping(start, end, int(parts[2], 16), int(parts[4]), path))
    out.sort()
    return out


def _written_pages(pagemap: Any, first: int, last: int) -> np.ndarray:
    """Prefix counts of the pages ``first..last`` (page numbers) that became private copies (written
    since mapped, or swapped out: only a written page of a file map can be swapped): ``out[j] -
    out[i]`` pages of ``first + i .. first + j - 1`` are. One read of the pagemap for the whole span."""
    count = last - first + 1
    pagemap.seek(first * 8)
    raw = pagemap.read(count * 8)
    if len(raw) != count * 8:
        raise OSError("short read of /proc/self/pagemap")
    entries = np.frombuffer(raw, dtype=np.uint64)
    present = (entries & np.uint64(_PRESENT)) != 0
    file_page = (entries & np.uint64(_FILE_PAGE)) != 0
    swapped = (entries & np.uint64(_SWAPPED)) != 0
    return np.concatenate([[0], np.cumsum((present & ~file_page) | swapped)])


def version(t: torch.Tensor) -> int:
    """The version counter (0 for inference tensors, which have none: their pages are still checked)."""
    return 0 if t.is_inference() else int(t._version)


def tensor_sources(tensors: Sequence[torch.Tensor]) -> tuple[Source, ...] | None:
    """The source of every tensor, or None when one of them has no source that is sure (module doc)."""
    if not sys.platform.startswith("linux") or not tensors:
        return None
    try:
        maps = _file_mappings()
        starts = [m.start for m in maps]
        keys: dict[str, FileKey | None] = {}
        spans: list[tuple[int, int, int]] = []  # (mapping index, first byte, byte count) per tensor
        for t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or version(t) != 0:
                return None
            begin, nbytes = t.data_ptr(), t.numel() * t.element_size()
            i = bisect.bisect_right(starts, begin) - 1
            if i < 0 or begin + nbytes > maps[i].end:
                return None
            m = maps[i]
            if m.path not in keys:
                try:
                    key: FileKey | None = file_key(m.path)
                except Exception:  # noqa: BLE001 - gone or unreadable: no sure source
                    key = None
                keys[m.path] = key if key is not None and key.inode == m.inode else None
            if keys[m.path] is None:
                return None
            spans.append((i, begin, nbytes))
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for i in sorted({i for i, _, _ in spans}):
                mine = [(b // _PAGE, (b + n - 1) // _PAGE) for j, b, n in spans if j == i]
                low = min(f for f, _ in mine)
                written = _written_pages(pagemap, low, max(last for _, last in mine))
                if any(written[last - low + 1] != written[f - low] for f, last in mine):
                    return None
        out = []
        for t, (i, begin, nbytes) in zip(tensors, spans):
            m = maps[i]
            file = keys[m.path]
            assert file is not None
            out.append(Source(file, m.offset + begin - m.start, nbytes, str(t.dtype), tuple(t.shape)))
        return tuple(out)
    except Exception as exc:  # noqa: BLE001 - best effort (no /proc in a sandbox, an odd maps line): object identity
        logger.debug("no mapped-file sources: %s", exc)
        return None
