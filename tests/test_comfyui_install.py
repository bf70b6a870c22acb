"""The README's install steps against a real ComfyUI (set COMFYUI_DIR; skipped otherwise): a copy of the
ComfyUI checkout gets this repository cloned into its ``custom_nodes/ComfyUI-FastLoRA`` and the pack's
requirements checked with the README's pip command; started headless, ComfyUI must list the nodes in
``/object_info`` and the example workflows, with their thumbnails, in its template endpoint.

    COMFYUI_DIR=~/ComfyUI python -m pytest -q tests/test_comfyui_install.py

The clone is of the committed state (HEAD), as a user's clone would be. The pip command runs with
``--dry-run --no-index`` so the test never changes the Python it runs in: it passes only when
everything the README's command would install is already there, and nothing would touch torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_comfyui_real import _free_port, _torchvision_pythonpath  # tests/ helpers for a headless ComfyUI

from fastlora_core import headless

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run these"),
]
FOLDER = "ComfyUI-FastLoRA"  # the folder name the README's clone command gives
NODES = {"OptimizedFluxLoader", "LoraHotswap", "LoraHotswapModel", "PadDummyLora", "Generate"}
TEMPLATES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def install_as_the_readme_says(comfyui: Path) -> subprocess.CompletedProcess[str]:
    """`cd ComfyUI/custom_nodes && git clone <this repository> ComfyUI-FastLoRA`, then the pip step
    (``python -m pip install -r ComfyUI-FastLoRA/requirements.txt``, as a dry run)."""
    custom_nodes = comfyui / "custom_nodes"
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), FOLDER], cwd=custom_nodes, check=True)
    else:  # an unpacked copy of the folder: the README's alternative
        shutil.copytree(ROOT, custom_nodes / FOLDER, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r",
                           f"{FOLDER}/requirements.txt"], cwd=custom_nodes, capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[headless.Client, Path, str]]:
    base = tmp_path_factory.mktemp("install")
    comfyui = base / "ComfyUI"
    shutil.copytree(COMFYUI_DIR, comfyui, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "user", "output", "temp"))
    for stale in (comfyui / "custom_nodes").iterdir():  # only what the README's steps put there
        if stale.is_dir():
            shutil.rmtree(stale)
    pip = install_as_the_readme_says(comfyui)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(_torchvision_pythonpath(cache) + [p for p in [env.get("PYTHONPATH")] if p])
    port = _free_port()
    log_path = base / "comfyui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch"], cwd=comfyui, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        client = headless.Client(f"127.0.0.1:{port}", timeout=60)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"ComfyUI exited: {log_path.read_text()[-3000:]}")
                try:
                    client.request("GET", "/system_stats")
                    break
                except headless.HeadlessError:
                    if time.monotonic() > deadline:
                        pytest.fail("ComfyUI did not start in 180 s")
                    time.sleep(1)
            yield client, comfyui, pip
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_readme_pip_step_needs_nothing_new_and_never_touches_torch(installed: Any) -> None:
    _client, _comfyui, pip = installed
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert "Would install" not in pip.stdout, pip.stdout


def test_cloned_pack_registers_its_nodes(installed: Any) -> None:
    client, _comfyui, _pip = installed
    info = client.request("GET", "/object_info")
    ours = {name for name, node in info.items() if node.get("python_module") == f"custom_nodes.{FOLDER}"}
    assert NODES <= ours, f"missing: {NODES - ours}"
    assert all(info[name]["category"].startswith("FastLoRA") for name in ours)
    loader = info["OptimizedFluxLoader"]["input"]
    assert list(loader["required"]) == ["source"]
    assert loader["optional"]["swap_strategy"][1]["advanced"] is True  # reaches the front end


def test_templates_are_listed_once_with_thumbnails(installed: Any) -> None:
    client, comfyui, _pip = installed
    listed = client.request("GET", "/api/workflow_templates")
    assert sorted(listed[FOLDER]) == TEMPLATES, listed  # each once: one template folder
    pack = comfyui / "custom_nodes" / FOLDER / "workflows"
    for name in TEMPLATES:
        served = client.get_bytes(f"/api/workflow_templates/{FOLDER}/{name}.json")
        assert json.loads(served) == json.loads((pack / f"{name}.json").read_text())
        thumbnail = client.get_bytes(f"/api/workflow_templates/{FOLDER}/{name}.jpg")
        assert thumbnail == (pack / f"{name}.jpg").read_bytes() and thumbnail[:2] == b"\xff\xd8"
