"""Against a real ComfyUI checkout (set COMFYUI_DIR; skipped otherwise): start it headless with the pack
in a custom_nodes folder and the tiny model in a models tree, run every workflows/api graph through
fastlora_core.headless, and check ComfyUI's caching, bit-exact A -> B -> A swaps, zero recompiles,
``POST /free``, and background compile workers under ComfyUI's module naming (two server starts).

    COMFYUI_DIR=~/ComfyUI python -m pytest -q tests/test_comfyui_real.py

ComfyUI's requirements must be importable by this Python (torch excluded). ComfyUI imports torchvision
at start-up; where no torchvision wheel matches the installed torch (CPU torch 2.13 here: PyPI only has
CUDA builds, whose C ops cannot load), the test downloads the matching torchvision release with
``pip download --no-deps`` into a cache folder and starts ComfyUI with it on PYTHONPATH plus a
``sitecustomize`` that declares the two operator schemas torchvision registers fakes for
unconditionally (``torchvision::nms``/``qnms``). Its pure-Python parts (transforms) then work; its C ops
fail if called, which neither ComfyUI's Flux path nor FastLoRA does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastlora_core import headless

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run these"),
]
logger = logging.getLogger(__name__)
# The MODEL-path graphs need ComfyUI's own CLIP and VAE nodes: tests/test_comfyui_model_server.py runs them.
API_FILES = sorted(p for p in (ROOT / "workflows" / "api").glob("*.json") if not p.stem.startswith("flux_model_"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchvision_pythonpath(cache: Path) -> list[str]:
    """Extra PYTHONPATH entries ComfyUI needs to import torchvision (see module docstring)."""
    ok = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    if ok.returncode == 0:
        return []
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    version = f"0.{minor + 15}.*" if major == 2 else None
    assert version, f"no torchvision mapping for torch {torch.__version__}"
    target = cache / f"torchvision-for-torch-{major}.{minor}"
    if not (target / "torchvision" / "__init__.py").exists():
        wheels = cache / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                        f"torchvision=={version}"], check=True)
        wheel = sorted(wheels.glob(f"torchvision-0.{minor + 15}.*.whl"))[-1]
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    shim = cache / "torchvision-schemas"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import torch\n"
        "_lib = torch.library.Library('torchvision', 'DEF')\n"
        "_lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "_lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
    )
    return [str(shim), str(target)]


def comfyui_commit() -> str:
    out = subprocess.run(["git", "-C", COMFYUI_DIR, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# The pack is installed twice (a clone plus a renamed backup, as users do): ComfyUI must still start.
PACK_COPIES = ("ComfyUI-FastLoRA", "ComfyUI-FastLoRA-backup")


@pytest.fixture(scope="module")
def comfy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("comfyui")


def _prepare(base: Path) -> None:
    """A ComfyUI base folder: the tiny models, the pack twice in custom_nodes, the paths config."""
    from fastlora_core.tiny import write_comfy_tree

    models = base / "models"
    write_comfy_tree(models)
    custom = base / "custom_nodes"
    custom.mkdir()
    for name in PACK_COPIES:
        (custom / name).symlink_to(ROOT, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"fastlora_test:\n  base_path: {models}\n  diffusers: diffusers\n  loras: loras\n"
                      f"  diffusion_models: diffusion_models\n  text_encoders: text_encoders\n  vae: vae\n"
                      f"  custom_nodes: {custom}\n")
    (base / "user").mkdir()


@contextlib.contextmanager
def _serve(base: Path, extra_env: dict[str, str] | None = None, log_name: str = "comfyui.log"
           ) -> Iterator[headless.Client]:
    """ComfyUI started headless on the CPU over a folder made by :func:`_prepare`; stopped after."""
    config = base / "extra_model_paths.yaml"
    custom = base / "custom_nodes"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    extra = _torchvision_pythonpath(cache)
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH", "")] if p])
    port = _free_port()
    log = open(base / log_name, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--output-directory", str(base / "output"), "--user-directory", str(base / "user"),
         "--extra-model-paths-config", str(config),
         "--preview-method", "latent2rgb"],  # exercise Generate's live previews too
        cwd=COMFYUI_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = headless.Client(f"127.0.0.1:{port}", timeout=60)
    logger.info("ComfyUI %s on port %d, log %s", comfyui_commit(), port, base / log_name)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / log_name).read_text()[-3000:]}")
            try:
                client.request("GET", "/system_stats")
                break
            except headless.HeadlessError:
                if time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not start in 180 s")
                time.sleep(1)
        assert "OptimizedFluxLoader" in client.request("GET", "/object_info/OptimizedFluxLoader"), \
            (base / log_name).read_text()[-3000:]
        # ComfyUI loads its own custom_nodes first (which may hold another, older copy of the pack),
        # then ours: the nodes that run, and the stats route, must be this checkout's.
        served = Path(client.request("GET", "/fastlora/stats")["pack"])
        assert served.parent == custom, f"the nodes of {served} run instead of this checkout's"
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(comfy_base: Path) -> Iterator[headless.Client]:
    _prepare(comfy_base)
    with _serve(comfy_base) as client:
        yield client


def tiny_overrides(graph: dict[str, Any], compile: str = "off") -> list[str]:
    """What ``headless --tiny`` sets (the README's smoke path): the tiny model, 64x64, 2 steps."""
    return headless.tiny_overrides(graph, compile)


def run(client: headless.Client, path: Path, sets: list[str], out: Path) -> headless.RunResult:
    graph = headless.apply_overrides(headless.load_workflow(path), sets)
    return headless.run_workflow(client, graph, out, on_event=None, timeout=600)


def pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def stats(client: headless.Client) -> dict[str, Any]:
    return client.request("GET", "/fastlora/stats")


def test_record_comfyui_commit(record_property: Any) -> None:
    commit = comfyui_commit()
    record_property("comfyui_commit", commit)
    print(f"ComfyUI commit under test: {commit}")


def test_a_second_copy_of_the_pack_is_logged_not_fatal(server: headless.Client, comfy_base: Path) -> None:
    log = (comfy_base / "comfyui.log").read_text()
    lines = [line for line in log.splitlines() if "installed twice" in line]
    assert len(lines) == 1, log[-3000:]
    assert all(name in lines[0] for name in PACK_COPIES)
    assert "Added route will never be executed" not in log
    assert Path(stats(server)["pack"]).name in PACK_COPIES


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_every_api_workflow_runs_on_the_tiny_model(server: headless.Client, path: Path, tmp_path: Path,
                                                  record_property: Any) -> None:
    """Every shipped workflow, as it is (the 24 GB one reads single files), through the README's
    smoke path (headless --tiny)."""
    graph = headless.load_workflow(path)
    t0 = time.monotonic()
    result = run(server, path, tiny_overrides(graph), tmp_path)
    record_property("seconds", round(time.monotonic() - t0, 1))  # reported, never asserted
    loader = next(n for n in graph.values() if n["class_type"] == "OptimizedFluxLoader")
    if loader["inputs"]["source"] == "single files":  # ComfyUI's single-file path, its own tokenizers
        assert "transformer=" in stats(server)["engines"][0]["source"]
    saves = [n for n in graph.values() if n["class_type"] == "SaveImage"]
    assert len(result.images) == len(saves)
    for image in result.images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if path.stem == "flux_lora_ab":  # two branches, two LoRAs, one engine: the images must differ
        assert pixels(result.images[0]) != pixels(result.images[1])


def test_lora_change_reruns_only_lora_and_generate_bit_exact_without_recompiling(
        server: headless.Client, tmp_path: Path) -> None:
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    graph = headless.load_workflow(path)
    loader = next(k for k, n in graph.items() if n["class_type"] == "OptimizedFluxLoader")
    lora = next(k for k, n in graph.items() if n["class_type"] == "LoraHotswap")
    gen = next(k for k, n in graph.items() if n["class_type"] == "Generate")
    base = tiny_overrides(graph, compile="regional")

    a1 = run(server, path, base + [f"{lora}.lora_name=fastlora-tiny-style.safetensors"], tmp_path / "a1")
    compiles = stats(server)["engines"][0]["compiles"]
    b = run(server, path, base + [f"{lora}.lora_name=fastlora-tiny-wide.safetensors"], tmp_path / "b")
    a2 = run(server, path, base + [f"{lora}.lora_name=fastlora-tiny-style.safetensors"], tmp_path / "a2")
    after = stats(server)

    for result in (b, a2):
        assert loader in result.cached, f"the loader re-ran: cached={result.cached}"
        assert lora in result.executed and gen in result.executed, f"executed={result.executed}"
        assert loader not in result.executed
    assert pixels(a1.images[0]) == pixels(a2.images[0]), "A -> B -> A did not give A's image back"
    assert pixels(a1.images[0]) != pixels(b.images[0]), "the LoRA swap changed nothing"
    assert after["engines"][0]["compiles"] == compiles, "a LoRA swap recompiled"
    assert after["last"]["new_compiles"] == 0 and after["last"]["swap"]["changed"]


def test_free_unloads_the_engine_and_the_next_run_rebuilds(server: headless.Client, tmp_path: Path) -> None:
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    graph = headless.load_workflow(path)
    gen = next(k for k, n in graph.items() if n["class_type"] == "Generate")
    sets = tiny_overrides(graph)
    run(server, path, sets, tmp_path / "before")
    before = stats(server)
    assert before["engines"] and any("loaded" in m for m in before["comfy_models"])

    # ComfyUI's prompt worker reads the /free flag after each prompt, then may run gc.collect(); a
    # /free posted during that gc sets the flag without waking the worker, which then sleeps up to
    # 1000 s (main.py's prompt_worker, ComfyUI 0.3.64). Seen once in four runs of this suite on a
    # loaded 2-core machine. Posting again wakes it, as a user's second click would; a flag that is
    # already taken unloads nothing more (``unloads`` below counts every unload).
    deadline = time.monotonic() + 30
    posted = 0.0
    while stats(server)["engines"] and time.monotonic() < deadline:
        if time.monotonic() - posted > 5:
            server.request("POST", "/free", {"unload_models": True})
            posted = time.monotonic()
        time.sleep(0.5)
    freed = stats(server)
    assert freed["engines"] == [] and freed["unloads"] == before["unloads"] + 1

    again = run(server, path, sets + [f"{gen}.seed=1234"], tmp_path / "after")
    after = stats(server)
    assert len(again.images) == 1 and after["builds"] == before["builds"] + 1 and len(after["engines"]) == 1


def test_refused_workflow_reports_comfyui_node_errors(server: headless.Client) -> None:
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    graph = headless.load_workflow(path)
    sets = tiny_overrides(graph) + ["2.lora_name=missing.safetensors"]
    with pytest.raises(headless.HeadlessError) as info:
        run(server, path, sets, Path("unused"))
    assert info.value.exit_code == headless.EXIT_REFUSED
    assert "missing.safetensors" in str(info.value) and "node 2 (LoraHotswap)" in str(info.value)
    assert json.dumps(info.value.details)  # the raw ComfyUI answer travels with the error


def test_cli_exit_codes(server: headless.Client, tmp_path: Path) -> None:
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    sets = ["--tiny"]  # the README's smoke path
    cmd = [sys.executable, "-m", "fastlora_core.headless", "--server", f"{server.host}:{server.port}", str(path)]
    ok = subprocess.run(cmd + sets + ["--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip().splitlines()[-1]).exists()
    assert "step 2/2" in ok.stderr
    assert ok.stderr.count("step 1/2") == 1, ok.stderr  # one progress event per step, previews on
    bad = subprocess.run(cmd + sets + ["--set", "3.width=65", "--out", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == headless.EXIT_FAILED, bad.stderr
    assert "node 3 (Generate)" in bad.stderr and "multiple of 16" in bad.stderr
    # the error type is the package's, not the install folder's
    assert "fastlora_core.errors.OptionsError" in bad.stderr and "custom_nodes" not in bad.stderr, bad.stderr
    assert bad.stderr.rstrip().splitlines()[-1].startswith("error: ComfyUI error in node 3")


def test_inputs_the_source_does_not_read_never_block_a_run(server: headless.Client, tmp_path: Path) -> None:
    """ComfyUI's own validation: with source = diffusers folder, single-file inputs naming files this
    machine does not have are ignored (the graph runs); with source = single files, a diffusers_model
    that does not exist is ignored and only the files the source reads are reported."""
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    graph = headless.load_workflow(path)
    loader = next(k for k, n in graph.items() if n["class_type"] == "OptimizedFluxLoader")
    absent = {"transformer": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors",
              "t5xxl": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
    unread = [f"{loader}.{name}={value}" for name, value in absent.items()]
    result = run(server, path, tiny_overrides(graph) + unread, tmp_path / "diffusers")
    assert len(result.images) == 1

    files = [f"{loader}.source=single files", f"{loader}.diffusers_model=FLUX.1-dev"]
    with pytest.raises(headless.HeadlessError) as info:
        run(server, path, tiny_overrides(graph) + unread + files, tmp_path / "files")
    assert info.value.exit_code == headless.EXIT_REFUSED
    assert "transformer = 'flux1-dev.safetensors' is not in models/diffusion_models" in str(info.value)
    assert "'FLUX.1-dev'" not in str(info.value), str(info.value)


def test_background_compile_inside_comfyui_saves_graphs_the_next_start_loads(tmp_path: Path) -> None:
    """Decision 41 under ComfyUI's own module naming (the custom node's path as package name): with
    ``FASTLORA_BACKGROUND_COMPILE=1`` the first image runs uncompiled while worker processes compile
    the two block classes, a later run loads their graphs, and a restarted server loads them without
    compiling anything."""
    base = tmp_path / "comfyui"
    base.mkdir()
    _prepare(base)
    switch = {"FASTLORA_BACKGROUND_COMPILE": "1", "FASTLORA_CACHE_DIR": str(tmp_path / "cache")}
    path = ROOT / "workflows" / "api" / "flux_lora_basic.json"
    graph = headless.load_workflow(path)
    gen = next(k for k, n in graph.items() if n["class_type"] == "Generate")
    sets = tiny_overrides(graph, compile="regional")

    def blocks(client: headless.Client) -> dict[str, Any]:
        return stats(client)["engines"][0]["saved_blocks"]

    with _serve(base, switch, "first.log") as client:
        run(client, path, sets + [f"{gen}.seed=1"], tmp_path / "first")
        first = blocks(client)
        assert first["compiled"] == 0 and first["eager_calls"] > 0, first  # uncompiled, nothing compiled here
        folder = Path(first["folder"])
        deadline = time.monotonic() + 500
        while len(list(folder.glob("*.bin"))) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        assert len(list(folder.glob("*.bin"))) == 2, ((base / "first.log").read_text()[-3000:], blocks(client))
        run(client, path, sets + [f"{gen}.seed=2"], tmp_path / "second")
        second = blocks(client)
        assert second["background"] == 2 and second["compiled"] == 0 and not second["failures"], second

    with _serve(base, switch, "restarted.log") as client:
        run(client, path, sets + [f"{gen}.seed=3"], tmp_path / "restarted")
        restarted = blocks(client)
    assert (restarted["loaded"], restarted["compiled"], restarted["eager_calls"]) == (2, 0, 0), restarted
