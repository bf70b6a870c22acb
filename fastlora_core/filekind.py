"""What kind of weights file is this? One answer for every reader (model single files, diffusers
folders, LoRA files).

A safetensors file starts with an 8-byte little-endian header length ``N`` followed by ``N`` bytes
of JSON that begin with ``{``. That structure is checked *first*: the first byte of a safetensors
file is the low byte of ``N`` and can be anything, including ``0x80`` (the first byte of a pickle)
or ``P`` (the first byte of a zip archive). Only a file that is not laid out like a safetensors file
is then classified by its magic bytes: ``GGUF``, a zip archive (PyTorch's ``torch.save`` format,
``.pt``/``.ckpt``/``.bin``) or a bare pickle (protocol 2+ starts with ``0x80``).
"""

from __future__ import annotations

import os
import struct
from typing import Literal

FileKind = Literal["safetensors", "pickle", "zip", "gguf", "unknown"]

#: Largest safetensors header we accept (the safetensors library refuses more than 100 MB).
MAX_HEADER_BYTES = 100_000_000


def sniff(path: str | os.PathLike[str]) -> FileKind:
    """Classify a file from its first bytes (reads at most 9 bytes; never the tensor data).

    ``safetensors`` means the header length fits the file and the header starts with ``{``; the
    header itself is parsed (and may still be refused) by the caller. ``unknown`` covers empty,
    truncated and random files.
    """
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"
