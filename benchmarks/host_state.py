"""What else the host is doing when a start-up run begins, and a way to wait until it does nothing.

A start is mostly Python on one core and reads from the page cache, so it is slowed by anything that
competes for the CPU, the memory bus or the disk: a previous run's compile workers still running, or
gigabytes of freshly written files (the model folder, compile artifacts) still being written back. The
first warm start after a cold one measured 1-2.5 s slower than later ones on 2026-12-05/06 (RESULTS.md);
``snapshot`` records the host's state before each run so that such a run can be told apart, and
``settle`` (the ``settle`` step of ``bench_startup --runs``) flushes dirty pages and waits for other busy
processes to finish, as on a host whose last start is long over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

#: A process using more than this share of one core over the sample counts as busy.
BUSY_SHARE = 0.2
#: Dirty plus under-writeback memory below this counts as flushed (bytes).
QUIET_DIRTY = 256 << 20


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemFree", "Cached", "Dirty", "Writeback"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """Per process: user + system clock ticks so far, and its command line (shortened)."""
    ticks: dict[int, tuple[int, str]] = {}
    me = os.getpid()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:  # no procfs (not Linux): nothing to report
        return ticks
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        ticks[int(entry.name)] = (int(fields[11]) + int(fields[12]), cmd[:160])
    return ticks


def snapshot(sample_s: float = 0.5) -> dict[str, Any]:
    """Dirty / writeback / free memory (GB), the load average, and the processes busy over ``sample_s``."""
    before = _cpu_ticks()
    time.sleep(sample_s)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (t1, cmd) in after.items():
        share = (t1 - before.get(pid, (t1, cmd))[0]) / hz / sample_s
        if share > BUSY_SHARE:
            busy.append({"pid": pid, "cpu": round(share, 2), "cmd": cmd})
    mem = _meminfo()
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {"gb": {k: round(v / 1e9, 2) for k, v in mem.items()}, "loadavg": load,
            "busy": sorted(busy, key=lambda b: -b["cpu"])}


def settle(max_s: float = 90.0) -> dict[str, Any]:
    """``sync``, then wait (up to ``max_s``) until no other process is busy and the dirty pages are written."""
    t0 = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - t0
    state = snapshot()
    while time.perf_counter() - t0 < max_s:
        dirty = sum(int(state["gb"].get(k, 0) * 1e9) for k in ("Dirty", "Writeback"))
        if not state["busy"] and dirty < QUIET_DIRTY:
            break
        state = snapshot()
    return {"sync_s": round(synced, 2), "waited_s": round(time.perf_counter() - t0, 2), "state": state}
