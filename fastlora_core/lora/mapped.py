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

:func:`file_ranges` answers the same question per tensor for the LoRA stager, which reads such
tensors' bytes from the file with ``preadv`` (page cache -> pinned memory, many threads, no page
faults) instead of through the mapping whose pages nothing has touched yet.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:  # cache -> staging -> this module: the cache's names are imported where used
    from .cache import FileKey

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


class FileRange(NamedTuple):
    """The bytes of a file a tensor holds unchanged; ``dev`` and ``inode`` say which file the mapping
    was made of (a reader checks that the path still names it)."""

    path: str
    dev: int
    inode: int
    offset: int
    nbytes: int


class _Mapping(NamedTuple):
    start: int
    end: int
    offset: int
    dev: int
    inode: int
    path: str


#: Parsed lines of ``/proc/self/maps`` by their text (which fixes what they say). A process with
#: ComfyUI, a CUDA context and a few LoRAs mapped has thousands of lines; parsing all of them on every
#: new LoRA (twice: ``tensor_sources`` and the stager's ``file_ranges``) took ~25 ms a time on a 2-core
#: CPU, ~3 ms with this cache.
_PARSED: dict[str, _Mapping | None] = {}
_PARSED_MAX = 20_000


def _parse_line(line: str) -> _Mapping | None:
    """The mapping a ``/proc/self/maps`` line describes when it maps a regular file, else None."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or parts[4] == "0":
        return None
    path = parts[5]
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    start, end = (int(x, 16) for x in parts[0].split("-"))
    major, minor = (int(x, 16) for x in parts[3].split(":"))
    return _Mapping(start, end, int(parts[2], 16), os.makedev(major, minor), int(parts[4]), path)


def _file_mappings() -> list[_Mapping]:
    """This process's memory maps of regular files, sorted by start address (lines seen before are
    not parsed again)."""
    with open("/proc/self/maps") as fh:
        lines = fh.read().splitlines()
    if len(_PARSED) > _PARSED_MAX:
        _PARSED.clear()
    out = []
    for line in lines:
        if line in _PARSED:
            found = _PARSED[line]
        else:
            found = _PARSED[line] = _parse_line(line)
        if found is not None:
            out.append(found)
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


def _locate(tensors: Sequence[torch.Tensor]) -> tuple[list[_Mapping], list[tuple[int, int, int] | None]]:
    """This process's file mappings, and per tensor ``(mapping index, first byte address, byte count)``
    when it is a contiguous, unwritten view of one of them (None otherwise). Raises OSError or
    ValueError when ``/proc`` cannot be read as expected."""
    maps = _file_mappings()
    starts = [m.start for m in maps]
    spans: list[tuple[int, int, int] | None] = []
    for t in tensors:
        span = None
        if t.device.type == "cpu" and t.is_contiguous() and t.numel() and version(t) == 0:
            begin, nbytes = t.data_ptr(), t.numel() * t.element_size()
            i = bisect.bisect_right(starts, begin) - 1
            if i >= 0 and begin + nbytes <= maps[i].end:
                span = (i, begin, nbytes)
        spans.append(span)
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for i in sorted({s[0] for s in spans if s is not None}):
            mine = [(j, s[1] // _PAGE, (s[1] + s[2] - 1) // _PAGE) for j, s in enumerate(spans)
                    if s is not None and s[0] == i]
            low = min(f for _, f, _ in mine)
            written = _written_pages(pagemap, low, max(last for _, _, last in mine))
            for j, f, last in mine:
                if written[last - low + 1] != written[f - low]:
                    spans[j] = None
    return maps, spans


def file_ranges(tensors: Sequence[torch.Tensor]) -> list[FileRange | None]:
    """Per tensor, the file bytes it holds unchanged (module doc), or None where that is not sure
    (then its memory is the truth). All None off Linux or when ``/proc`` cannot be read."""
    if not sys.platform.startswith("linux") or not tensors:
        return [None] * len(tensors)
    try:
        maps, spans = _locate(tensors)
    except Exception as exc:  # noqa: BLE001 - best effort (no /proc in a sandbox, an odd maps line)
        logger.debug("no mapped-file ranges: %s", exc)
        return [None] * len(tensors)
    out: list[FileRange | None] = []
    for span in spans:
        if span is None:
            out.append(None)
            continue
        i, begin, nbytes = span
        m = maps[i]
        out.append(FileRange(m.path, m.dev, m.inode, m.offset + begin - m.start, nbytes))
    return out


def tensor_sources(tensors: Sequence[torch.Tensor]) -> tuple[Source, ...] | None:
    """The source of every tensor, or None when one of them has no source that is sure (module doc)."""
    from .cache import file_key

    if not sys.platform.startswith("linux") or not tensors:
        return None
    try:
        maps, spans = _locate(tensors)
        if any(span is None for span in spans):
            return None
        keys: dict[str, FileKey | None] = {}
        out = []
        for t, span in zip(tensors, spans):
            assert span is not None
            i, begin, nbytes = span
            m = maps[i]
            if m.path not in keys:
                try:
                    key: FileKey | None = file_key(m.path)
                except Exception:  # noqa: BLE001 - gone or unreadable: no sure source
                    key = None
                keys[m.path] = key if key is not None and key.inode == m.inode else None
            file = keys[m.path]
            if file is None:
                return None
            out.append(Source(file, m.offset + begin - m.start, nbytes, str(t.dtype), tuple(t.shape)))
        return tuple(out)
    except Exception as exc:  # noqa: BLE001 - best effort (no /proc in a sandbox, an odd maps line): object identity
        logger.debug("no mapped-file sources: %s", exc)
        return None
