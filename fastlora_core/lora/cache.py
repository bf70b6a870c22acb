"""A bounded in-RAM cache of parsed LoRA files, so switching back to a recent LoRA does not re-read
the disk, and the file identity that decides when a cached (or applied) LoRA is stale.

A user who re-trains or re-downloads a LoRA under the same name must get the new weights on the
next request. :func:`file_key` notices such a rewrite cheaply (no full read): it combines what
``stat`` says (resolved path, size, mtime, ctime, inode) with a fingerprint of the file's content
(the safetensors header plus :data:`FINGERPRINT_BLOCKS` blocks of :data:`FINGERPRINT_BLOCK_BYTES`
spread evenly over the tensor data). ``ctime`` and the inode change on any rewrite on POSIX systems
even when a tool restores size and mtime; the fingerprint covers systems where ``st_ctime`` is the
creation time (Windows) and copies that keep every timestamp. Only the newest version of a path
stays in the cache.

It also holds LoRAs that never were files (``put``): ComfyUI's LoRA loaders hand FastLoRA's MODEL
their weights in memory. Each gets a path ``memory:<n>`` of its own, never reused, usable in a
``LoraSpec`` like a file path, so the engine's declarative stacks, swaps and staging treat both kinds
the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import NamedTuple

import torch

from ..errors import LoraFormatError
from .staging import PinnedStager
from .types import NormalizedLora

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = int(os.environ.get("FASTLORA_LORA_CACHE_MB", "4096")) * 1024 * 1024

#: Content fingerprint: this many blocks of this many bytes, evenly spread over the tensor data
#: (first and last included), are hashed with the header. ~64 KiB read per file and request.
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 4096
_MAX_HASHED_HEADER = 16 * 1024 * 1024
MEMORY_PREFIX = "memory:"


class FileKey(NamedTuple):
    """Identity of one version of a LoRA file; equal keys mean the same bytes (see module doc)."""

    path: str  # resolved (symlinks followed)
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    fingerprint: str


def _fingerprint(fh, size: int) -> str:
    """blake2b of the safetensors header and of blocks spread over the data (any file: its start)."""
    h = hashlib.blake2b(digest_size=16)
    head = fh.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    start = 8 + n if 8 + n <= size and n <= _MAX_HASHED_HEADER else 0
    fh.seek(0)
    h.update(fh.read(start))
    data = size - start
    if data <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES:
        h.update(fh.read(data))
    else:
        step = (data - FINGERPRINT_BLOCK_BYTES) / (FINGERPRINT_BLOCKS - 1)
        for i in range(FINGERPRINT_BLOCKS):
            fh.seek(start + int(i * step))
            h.update(fh.read(FINGERPRINT_BLOCK_BYTES))
    return h.hexdigest()


def file_key(path: str) -> FileKey:
    """The current identity of the file at ``path`` (see module doc). Raises LoraFormatError when
    it does not exist."""
    if path.startswith(MEMORY_PREFIX):  # an in-memory LoRA: its path is its identity
        return FileKey(path, 0, 0, 0, 0, "memory")
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise LoraFormatError(f"LoRA path {path} is a folder, not a file. Choose the .safetensors file inside it.")
    try:
        with open(real, "rb") as fh:
            st = os.fstat(fh.fileno())
            fingerprint = _fingerprint(fh, st.st_size)
    except FileNotFoundError as exc:
        raise LoraFormatError(
            f"LoRA file not found: {path}. Check the file name (in ComfyUI: models/loras)."
        ) from exc
    except OSError as exc:
        raise LoraFormatError(f"LoRA file {path} cannot be read ({exc}). Check its permissions.") from exc
    return FileKey(real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, fingerprint)


class LoraCache:
    """LRU cache of ``NormalizedLora`` bounded by total tensor bytes; one version per path."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[FileKey, NormalizedLora] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: str) -> tuple[FileKey, NormalizedLora]:
        """Parsed LoRA for ``path`` (read on a miss). Raises LoraFormatError for bad files; its values
        are checked for NaN / infinities by whoever applies it (``values_checked``)."""
        key, lora, _ = self.lookup(path)
        return key, lora

    def lookup(self, path: str, key: FileKey | None = None) -> tuple[FileKey, NormalizedLora, bool]:
        """Like ``get``, also saying whether it came from RAM (True) or was read from disk.
        ``key``: the file's identity when the caller has just computed it."""
        from .formats import read_lora

        key = key or file_key(path)
        with self._lock:
            lora = self._items.get(key)
            if lora is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return key, lora, True
        if path.startswith(MEMORY_PREFIX):
            raise LoraFormatError(
                f"The in-memory LoRA {path} is no longer cached (FASTLORA_LORA_CACHE_MB is too small for the "
                "LoRAs in use). Queue the workflow again; raise FASTLORA_LORA_CACHE_MB if this repeats."
            )
        lora = read_lora(path, check_finite=False)  # checked where the engine stages it (decision 32)
        with self._lock:
            self.misses += 1
            for old in [k for k in self._items if k.path == key.path]:  # older versions of this file
                self._drop(old)
            size = lora.nbytes()
            if size <= self.max_bytes:
                self._items[key] = lora
                self._bytes += size
                while self._bytes > self.max_bytes and self._items:
                    self._drop(next(iter(self._items)))
        return key, lora, False

    def _drop(self, key: FileKey) -> None:
        self._bytes -= self._items.pop(key).nbytes()

    def put(self, lora: NormalizedLora) -> str:
        """Keep a LoRA built in memory; returns its new, never reused path ``memory:<n>``. Evicted
        like files (least recently used first); ``has`` tells whether it is still here."""
        with self._lock:
            self._counter += 1
            path = f"{MEMORY_PREFIX}{self._counter}"
            self._items[file_key(path)] = lora
            self._bytes += lora.nbytes()
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))
            return path

    def mark_checked(self, key: FileKey) -> None:
        """Record that the values of the in-memory LoRA under ``key`` were found finite, so they are
        not checked again (see ``NormalizedLora.values_checked``)."""
        with self._lock:
            lora = self._items.get(key)
            if lora is not None and not lora.values_checked:
                self._items[key] = replace(lora, values_checked=True)

    def has(self, path: str) -> bool:
        """Whether an in-memory LoRA (``put``) is still cached."""
        with self._lock:
            return file_key(path) in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


GLOBAL_CACHE = LoraCache()


class DeviceLoraCache:
    """The device-side neighbour of :class:`LoraCache`: recently used LoRAs kept on a GPU in the
    engine's dtype, so swapping back to one copies nothing over PCIe. Bounded by
    :meth:`budget_bytes` (at most 8 GiB, 1/20 of the GPU); the least recently used go first, never
    the one just staged. Only the newest version of a path is kept. On a CPU (or with offload) it
    hands LoRAs through unchanged."""

    def __init__(self, device: torch.device, dtype: torch.dtype, enabled: bool = True) -> None:
        self.device = device
        self.dtype = dtype
        self.enabled = enabled and device.type == "cuda"
        self._loras: OrderedDict[FileKey, NormalizedLora] = OrderedDict()
        #: packs a LoRA's tensors through reusable pinned chunks (None: one ``tensor.to`` each)
        self.stager: PinnedStager | None = PinnedStager(device) if self.enabled else None

    def __contains__(self, key: FileKey) -> bool:
        return key in self._loras

    def __getitem__(self, key: FileKey) -> NormalizedLora:
        return self._loras[key]

    def budget_bytes(self) -> int:
        total = torch.cuda.get_device_properties(self.device).total_memory
        return min(8 * 2**30, total // 20)

    def stage(self, key: FileKey, lora: NormalizedLora) -> NormalizedLora:
        """``lora`` on the device (a cached copy when there is one); ``lora`` itself when disabled.
        A new copy is synchronised before it is returned, so its transfer is over."""
        if not self.enabled:
            return lora
        staged = self._loras.get(key)
        if staged is None:
            for old in [k for k in self._loras if k.path == key.path]:  # a rewritten file's old version
                del self._loras[old]
            staged = lora.to(self.device, self.dtype, copy_many=self.stager)
            torch.cuda.synchronize(self.device)
            if self.stager is not None:
                logger.debug("%s staged: %.1f MB read from its file, %.1f MB copied from memory; ms %s", lora.path,
                             self.stager.last_read_bytes / 1e6, self.stager.last_copied_bytes / 1e6,
                             {k: round(v, 1) for k, v in self.stager.last_ms.items()})
            self._loras[key] = staged
            budget = self.budget_bytes()
            while len(self._loras) > 1 and sum(x.nbytes() for x in self._loras.values()) > budget:
                self._loras.popitem(last=False)
        self._loras.move_to_end(key)
        return staged

    def drop(self, key: FileKey) -> None:
        """Forget the staged copy of ``key`` (a LoRA refused after staging)."""
        self._loras.pop(key, None)

    def clear(self) -> None:
        self._loras.clear()
