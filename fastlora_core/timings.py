"""Where the time to the first image goes: a phase recorder for the engine, and the process's age.

Start-up (issue 13) is a sum of unlike parts: Python imports, reading weights from disk, quantising
and moving them to the GPU, the fused strategy's bf16 masters, compiling, the first image. The engine
records its own phases here (``FluxEngine.timings``); the CLI adds the imports and the process's age,
so one ``timings.json`` says where every second between ``python`` starting and the first image went.

On a GPU, a phase ends with ``torch.cuda.synchronize()`` so that asynchronous copies are charged to the
phase that queued them (a few microseconds each; the engine records about ten phases). On the CPU
nothing is synchronised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Phases:
    """Seconds per named phase, in the order they first ran (a phase that runs twice adds up)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda" and torch.cuda.is_initialized():
                torch.cuda.synchronize(self.device)
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def process_age() -> float | None:
    """Seconds since this process started (from ``/proc``: its start time in clock ticks since boot
    against the system's uptime), or None where ``/proc`` cannot tell (not Linux)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5); 2 fields precede
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - started
    return age if age >= 0 else None
