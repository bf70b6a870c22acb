"""A bounded in-RAM cache of parsed LoRA files, so switching back to a recent LoRA does not re-read
the disk. Entries are keyed by (path, size, mtime): a file rewritten in place is read again."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

from ..errors import LoraFormatError
from .types import NormalizedLora

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = int(os.environ.get("FASTLORA_LORA_CACHE_MB", "4096")) * 1024 * 1024

FileKey = tuple[str, int, int]


def file_key(path: str) -> FileKey:
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise LoraFormatError(
            f"LoRA file not found: {path}. Check the file name (in ComfyUI: models/loras)."
        ) from exc
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


class LoraCache:
    """LRU cache of ``NormalizedLora`` bounded by total tensor bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[FileKey, NormalizedLora] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: str) -> tuple[FileKey, NormalizedLora]:
        """Parsed LoRA for ``path`` (read on a miss). Raises LoraFormatError for bad files."""
        key, lora, _ = self.lookup(path)
        return key, lora

    def lookup(self, path: str) -> tuple[FileKey, NormalizedLora, bool]:
        """Like ``get``, also saying whether it came from RAM (True) or was read from disk."""
        from .formats import read_lora

        key = file_key(path)
        with self._lock:
            lora = self._items.get(key)
            if lora is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return key, lora, True
        lora = read_lora(path)
        with self._lock:
            self.misses += 1
            size = lora.nbytes()
            if size <= self.max_bytes:
                self._items[key] = lora
                self._bytes += size
                while self._bytes > self.max_bytes and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes()
        return key, lora, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


GLOBAL_CACHE = LoraCache()
