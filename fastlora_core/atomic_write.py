"""Files written whole or not at all: into a temporary name in the same folder, then renamed.

Another process sharing the folder (a second server on the same cache, a background compile worker's
serving process) never reads a half-written file, and a writer killed midway leaves nothing under the
real name, only a temporary file (:func:`is_partial`) that its folder's owner may delete. Stdlib only
(:mod:`.deps` uses it before torch is imported).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

_SUFFIX = ".part"


def write_whole(path: Path, write: Callable[[str], object]) -> None:
    """``write(temporary_path)`` then rename to ``path`` (the folder is created); the temporary file
    is removed when ``write`` or the rename fails, and the error propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{_SUFFIX}")
    try:
        write(str(part))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def is_partial(name: str) -> bool:
    """Whether a file name is one of :func:`write_whole`'s temporary files."""
    return name.startswith(".") and name.endswith(_SUFFIX)
