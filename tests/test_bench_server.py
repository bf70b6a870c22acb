"""benchmarks/bench_server.py end to end against a real ComfyUI (set COMFYUI_DIR; skipped otherwise), on
the CPU with the tiny transformer and the full-size VAE: every path's graphs run through the HTTP API
and the JSON holds each number the GPU run reports, before device time is spent on it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run these"),
]
NUMBERS = ("server_ready_s", "first_image_s", "server_start_to_first_image_s", "steady_s", "after_lora_change_s",
           "after_strength_change_s", "back_to_A_s", "compiles_after_first_image")


def test_bench_server_tiny_runs_every_path(tmp_path: Path) -> None:
    from test_comfyui_real import _torchvision_pythonpath

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    env = dict(os.environ, FASTLORA_BENCH_PYTHONPATH=os.pathsep.join(_torchvision_pythonpath(cache)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_server", COMFYUI_DIR, "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--paths",
                           "ours_model,native_bf16,ours_generate,ours_model_workflow", "--budget", "600"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "server.json").read_text())
    # ComfyUI's own text encoders are full size: that path is for the GPU, and says so
    assert res["ours_model_workflow"] == {"skipped": "full size only: ComfyUI builds CLIP-L and T5-XXL at full size"}
    for path in ("ours_model", "native_bf16", "ours_generate"):
        run = res[path]
        assert "error" not in run, (run.get("error"), run.get("log_tail"))
        assert all(k in run for k in NUMBERS), run
        # only the LoRA node and what follows re-ran after the LoRA change: never the loader
        assert "1" in run["first_executed"] and "1" not in run["after_lora_change_executed"]
        nodes = run["node_seconds_each_image"]  # per-node seconds: the loader ran only for the first image
        assert len(nodes) == 6 and all(v >= 0 for n in nodes for v in n.values()), nodes
        assert nodes[0] and not any(k.endswith("Loader") for n in nodes[1:] for k in n), nodes
        assert all(n["(prompt)"] >= n["KSampler" if "KSampler" in n else "Generate"] for n in nodes), nodes
        # each image waited for ComfyUI's periodic gc.collect() of the one before (it ran, and was timed)
        assert len(run["settle_wait_s"]) == 6 and any("(gc.collect)" in n for n in nodes), run["settle_wait_s"]
    assert res["ours_model"]["compiles_after_first_image"] == 0
    for path in ("ours_model", "ours_generate"):  # six images, each with the engine's last swap report
        swaps = res[path]["last_swap_after_each_image"]
        assert len(swaps) == 6 and all(sw is not None and "read_ms" in sw for sw in swaps)


def test_bench_server_cycles_use_a_new_lora_file_each_time(tmp_path: Path) -> None:
    """``--cycles 2``: the change sequence twice, each time with a LoRA file never used before; the change
    rows are the medians of the cycles' values."""
    from test_comfyui_real import _torchvision_pythonpath

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    env = dict(os.environ, FASTLORA_BENCH_PYTHONPATH=os.pathsep.join(_torchvision_pythonpath(cache)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_server", COMFYUI_DIR, "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--paths", "ours_generate", "--cycles", "2",
                           "--budget", "600"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "server.json").read_text())["ours_generate"]
    assert "error" not in run, (run.get("error"), run.get("log_tail"))
    assert len(run["steady_s"]) == 4 and len(run["node_seconds_each_image"]) == 11
    for key in ("after_lora_change", "after_strength_change", "back_to_A"):
        values = run[f"{key}_each_cycle_s"]
        assert len(values) == 2 and run[f"{key}_s"] == statistics.median(values), (key, run)
    files = [sw["stack"][0]["file"] for sw in run["last_swap_after_each_image"]]
    changed = [files[3], files[8]]  # the image right after each cycle's LoRA change
    assert len(set(changed)) == 2 and files[0] not in changed, files
    assert [sw["from_cache"] for sw in (run["last_swap_after_each_image"][i] for i in (3, 8))] == [False, False]
