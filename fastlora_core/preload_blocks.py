"""The saved block graphs of the last first request, loaded while the weights are read (decision 48).

A warm start loads each block class's saved graph (:mod:`.precompile`) at the first image's first
call of that class: 0.3-0.45 s of the first image on the H100 hosts measured, spent deserialising the
graph and loading its kernels. Which files that first call asks for is known only once the blocks are
built and quantised (their fingerprint is part of the name) and the request is known (its sizes), too
late for the read phase. So each process remembers which files its first call of every block class
used, under a tag that the engine can compute before it reads anything (its key: model and options);
the next process with the same tag loads those files in the loader's idle time (``direct.while_waiting``,
decision 42) and the first call takes the loaded graph instead of reading the file.

A preloaded graph is used only for the very file a block asks for, so a first request of another size
or a changed model simply does not use it (the files' names say what they were compiled for); the
graphs not used are dropped once every block class has its first graph.

Opt-in (``FASTLORA_PRELOAD_BLOCKS=1``), because no measured start gave it a turn (2026-12-06, H100 and
H200): with the page cache the earlier idle work fills every read wait, and on a disk-cold start the idle
work spends the reads on torchao's import (decision 49). The record is kept either way (a few hundred
bytes per engine key), so a start with the switch on preloads at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic_write import write_whole
from .precompile import load_saved

logger = logging.getLogger(__name__)

#: The record of a tag's first files: ``first-<tag digest>.json`` beside the saved blocks.
PREFIX = "first-"

#: ``FASTLORA_PRELOAD_BLOCKS=1`` turns the preload on (decision 48; off: no measured start gave it a turn).
ENV_SWITCH = "FASTLORA_PRELOAD_BLOCKS"


def enabled() -> bool:
    """Whether the loader preloads the last first request's graphs while it waits for a read."""
    return os.environ.get(ENV_SWITCH, "0") == "1"


def tag_of(text: str) -> str:
    """A short digest of what identifies an engine (its key's repr) for a record's file name."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class FirstGraphs:
    """The record of one engine tag's first block files in a saved-blocks folder, and those files'
    graphs once :meth:`load` has read them."""

    def __init__(self, folder: Path, tag: str, device: torch.device) -> None:
        self.folder = folder
        self.device = device
        self.record = folder / f"{PREFIX}{tag}.json"
        self._loaded: dict[str, Callable[..., Any]] = {}
        self._first: dict[str, tuple[str, bool]] = {}  # block class -> its first call's file, inference mode
        self._settled = False  # every class had its first call: nothing loaded from now on is used
        self._lock = threading.Lock()

    def load(self) -> int:
        """Read the recorded files' graphs (the loader's idle work): returns how many loaded. Each is
        loaded in the grad mode its first call ran in (a saved graph's guards take the mode they are
        loaded in) and on the engine's GPU. A file that is gone or does not load is left to the first
        call, which reports it."""
        t0 = time.perf_counter()
        n = 0
        for name, inference in self._recorded().values():
            if self._settled:  # a load on the idle-work thread that outlived the first image's calls
                break
            path = self.folder / name
            if Path(name).name != name or not path.is_file():
                continue
            try:
                with contextlib.ExitStack() as stack:
                    if self.device.type == "cuda":
                        stack.enter_context(torch.cuda.device(self.device))
                    stack.enter_context(torch.inference_mode(inference))
                    fn = load_saved(path)
            except Exception as exc:  # noqa: BLE001 - the first call reads it again and says why
                logger.info("could not preload the compiled block %s (%s: %s)", path, type(exc).__name__, exc)
                continue
            with self._lock:
                if self._settled:
                    break
                self._loaded[str(path)] = fn
            n += 1
        if n:
            logger.info("preloaded %d compiled block graph(s) of the last first request in %.2f s", n,
                        time.perf_counter() - t0)
        return n

    def take(self, path: Path) -> Callable[..., Any] | None:
        """The graph preloaded from ``path`` (handed over once), or None."""
        with self._lock:
            return self._loaded.pop(str(path), None)

    def first_call(self, cls_name: str, path: Path, inference: bool, classes: int) -> None:
        """Note the file the first call of block class ``cls_name`` uses (and whether it ran in
        inference mode); once all ``classes`` block classes have one, write the record (when it
        changed) and drop the graphs not taken."""
        with self._lock:
            if cls_name in self._first:
                return
            self._first[cls_name] = (path.name, inference)
            if len(self._first) < classes:
                return
            unused, self._loaded, self._settled = len(self._loaded), {}, True
            files = dict(sorted(self._first.items()))
        if unused:
            logger.info("%d preloaded block graph(s) were not for this first request; dropped", unused)
        if self._recorded() == files:
            return
        doc = {"files": {cls: {"file": name, "inference": inference} for cls, (name, inference) in files.items()}}
        try:
            write_whole(self.record, lambda part: Path(part).write_text(json.dumps(doc)))
        except OSError as exc:  # a read-only cache: the next start loads at the first call, as before
            logger.info("could not record the first block graphs in %s (%s)", self.record, exc)

    def _recorded(self) -> dict[str, tuple[str, bool]]:
        """The record as block class -> (the file its first call used in the last process with this
        tag, whether that call ran in inference mode); empty when missing or unreadable."""
        try:
            files = json.loads(self.record.read_text())["files"]
            return {str(cls): (str(e["file"]), bool(e["inference"])) for cls, e in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
