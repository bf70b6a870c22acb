"""benchmarks/bench_startup.py end to end on the tiny model (CPU): proves the script works before GPU
time is spent on it, and that each run's breakdown covers the time from process start to first image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_startup_tiny_api_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other"  # another checkout, as a before/after pair has it
    for part in ("fastlora_core", "benchmarks"):
        shutil.copytree(ROOT / part, other / part, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_startup", "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"),
                           "--runs", "api_cold,settle,api_warm_ordinary,api_warm_parts,cli_warm,api_warm_othertree,api_warm_othertree",
                           "--other-tree", str(other), "--bytecode", "as-is"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "startup.json").read_text())
    for name in ("api_cold", "api_warm_ordinary", "cli_warm", "api_warm_othertree", "api_warm_othertree#2"):
        run = res["runs"][name]
        assert run["rc"] == 0, run.get("error_tail")
        row = run["breakdown"]
        assert {"imports", "engine_setup", "read", "transformer", "first_lora", "compile_setup", "compile_est",
                "image"} <= set(row)
        assert all(v >= 0 for k, v in row.items() if k != "unaccounted")
        # the parts are measured inside the child's total: together they cannot exceed it by more than rounding
        assert row["unaccounted"] >= -0.1
        assert row["process_start_to_first_image_s"] <= run["wall_s"]
        assert "Dirty" in run["host_before"]["gb"] and isinstance(run["host_before"]["busy"], list)
    # ``settle`` is a step between runs: it flushes and waits, and runs nothing
    assert {"sync_s", "waited_s", "state"} <= set(res["runs"]["settle"])
    # ``_othertree`` runs the other checkout's code; a repeated run is kept beside the first, not over it
    assert res["runs"]["api_warm_othertree"]["code"] == str(other)
    assert res["runs"]["api_warm_othertree#2"]["code"] == str(other)
    assert res["runs"]["api_cold"]["code"] == str(ROOT)
    # ``_parts``: every image (the first and the steady one) timed by part, each of the two steps on its own
    parts = res["runs"]["api_warm_parts"]["child"]["image_parts"]
    assert len(parts) == 2
    for image in parts:
        assert len(image["steps_s"]) == 2 and image["encode_s"] > 0 and image["decode_s"] > 0


def test_run_names_combine_variants() -> None:
    """``api_cold_othersize_noexpected`` is a cold API run with both variants (a miss of decision 47's
    expected request, measured against the start without it); ``disk_cold`` is a mode, not a variant."""
    from benchmarks.bench_startup import split_variants

    assert split_variants("cold_othersize_noexpected") == ("cold", {"othersize", "noexpected"})
    assert split_variants("warm_parts") == ("warm", {"parts"})
    assert split_variants("disk_cold") == ("disk_cold", set())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the host's state is read from Linux's /proc")
def test_host_snapshot_names_a_busy_process() -> None:
    """A run's ``host_before`` must show a leftover process that competes for the CPU (the suspected cause
    of slow first warm starts), and ``settle`` must wait for it rather than report a quiet host."""
    from benchmarks import host_state

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)
        busy = host_state.snapshot()["busy"]
        assert any(b["pid"] == spin.pid and b["cpu"] > 0.5 for b in busy), busy
        settled = host_state.settle(max_s=20)
        assert settled["waited_s"] >= 1.5
        assert all(b["pid"] != spin.pid for b in settled["state"]["busy"])
    finally:
        spin.kill()
        spin.wait()
