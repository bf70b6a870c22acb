"""The shipped MODEL-path workflows on a real ComfyUI server (set COMFYUI_DIR; skipped otherwise).

The server runs headless with the pack, a tiny Flux transformer that ComfyUI's UNETLoader could load
(full width, one double and one single block) and two LoRAs. ComfyUI's CLIP nodes cannot run a tiny
T5 (its width is fixed), so each workflow is run with its text nodes replaced by a test node that
builds the same kind of CONDITIONING from a seed, and its VAE decode replaced by ``SaveLatent``;
everything between (our loader's MODEL, ``LoraLoaderModelOnly``, ``KSampler``, ``LatentUpscaleBy``)
runs as shipped. Checked: the graphs run; two LoRA branches differ; changing only a LoRA's strength
or file re-runs that LoRA node and the samplers after it, never the loader, without compiling;
A -> B -> A gives A's latents back bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastlora_core import headless

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run these"),
]
TEST_NODE = '''
import torch


class FastLoRATestConditioning:
    """CONDITIONING as ComfyUI's Flux text encoders make it (T5 4096 wide, pooled CLIP 768), from a seed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8, "min": 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]],)


NODE_CLASS_MAPPINGS = {"FastLoRATestConditioning": FastLoRATestConditioning}
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from safetensors.torch import save_file
    from test_comfyui_real import _free_port, _torchvision_pythonpath

    from fastlora_core.tiny import COMFY_TINY_TRANSFORMER_NAME, write_comfy_tiny_transformer

    base = tmp_path_factory.mktemp("comfyui-model")
    models = base / "models"
    write_comfy_tiny_transformer(models / "diffusion_models" / COMFY_TINY_TRANSFORMER_NAME)
    import torch

    g = torch.Generator().manual_seed(3)
    (models / "loras").mkdir(parents=True)
    for name, module, rows in (("tiny-a", "double_blocks.0.img_attn.qkv", 9216), ("tiny-b", "single_blocks.0.linear2", 3072)):
        ins = 3072 if name == "tiny-a" else 15360
        save_file({f"diffusion_model.{module}.lora_up.weight": torch.randn(rows, 4, generator=g) * 0.25,
                   f"diffusion_model.{module}.lora_down.weight": torch.randn(4, ins, generator=g) * 0.5 / ins**0.5},
                  str(models / "loras" / f"{name}.safetensors"))
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lokr_w1": torch.randn(64, 64, generator=g) * 0.05,
               "diffusion_model.double_blocks.0.img_attn.proj.lokr_w2": torch.randn(48, 48, generator=g) * 0.05},
              str(models / "loras" / "tiny-lokr.safetensors"))  # what ComfyUI's loaders cannot hand this MODEL
    custom = base / "custom_nodes"
    (custom / "fastlora_test_nodes").mkdir(parents=True)
    (custom / "fastlora_test_nodes" / "__init__.py").write_text(TEST_NODE)
    (custom / "ComfyUI-FastLoRA").symlink_to(ROOT, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"fastlora_test:\n  base_path: {models}\n  diffusion_models: diffusion_models\n"
                      f"  loras: loras\n  custom_nodes: {custom}\n")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    extra = _torchvision_pythonpath(cache)
    environ["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [environ.get("PYTHONPATH", "")] if p])
    (base / "user").mkdir()
    port = _free_port()
    log = open(base / "comfyui.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--output-directory", str(base / "output"), "--user-directory", str(base / "user"),
         "--extra-model-paths-config", str(config)],
        cwd=COMFYUI_DIR, env=environ, stdout=log, stderr=subprocess.STDOUT)
    client = headless.Client(f"127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                client.request("GET", "/system_stats")
                break
            except headless.HeadlessError:
                if time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not start in 180 s")
                time.sleep(1)
        yield {"client": client, "output": base / "output", "log": base / "comfyui.log",
               "transformer": COMFY_TINY_TRANSFORMER_NAME}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def tiny_graph(path: Path, transformer: str, loras: list[str], seed: int = 0, files: tuple[str, ...] = ()) -> dict[str, Any]:
    """A shipped MODEL workflow pointed at the tiny model: text nodes -> the test conditioning node,
    VAE decode -> SaveLatent; the loader, LoRA loaders and samplers stay as shipped (``loras`` for
    ComfyUI's loaders, ``files`` for FastLoRA's LoRA Hotswap for MODEL). ``seed`` varies the
    conditioning, so that no node of one test's graph is served from ComfyUI's cache of another's."""
    graph = headless.load_workflow(path)
    out: dict[str, Any] = {}
    lora_i = 0
    for nid, node in graph.items():
        kind, inputs = node["class_type"], dict(node["inputs"])
        if kind in ("DualCLIPLoader", "VAELoader", "SaveImage"):
            continue
        if kind == "CLIPTextEncode":
            node = {"class_type": "FastLoRATestConditioning", "inputs": {"seed": seed + int(nid), "tokens": 8}}
        elif kind == "VAEDecode":
            node = {"class_type": "SaveLatent", "inputs": {"samples": inputs["samples"], "filename_prefix": f"n{nid}"}}
        elif kind == "OptimizedFluxLoader":
            inputs.update(transformer=transformer, quantization="none", compile="off", dtype="float32")
            node = {**node, "inputs": inputs}
        elif kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = loras[lora_i % len(loras)]
            lora_i += 1
            node = {**node, "inputs": inputs}
        elif kind == "LoraHotswapModel":
            node = {**node, "inputs": {**inputs, "lora_name": files[0]}}
        elif kind == "EmptySD3LatentImage":
            node = {**node, "inputs": {**inputs, "width": 64, "height": 64}}
        elif kind == "KSampler":
            node = {**node, "inputs": {**inputs, "steps": 2}}
        out[nid] = node
    return out


def run(env: dict[str, Any], graph: dict[str, Any]) -> tuple[headless.RunResult, dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    result = headless.run_workflow(env["client"], graph, None, on_event=None, timeout=900)
    latents: dict[str, Any] = {}
    for nid, node_out in result.history.get("outputs", {}).items():
        for item in node_out.get("latents", []):
            path = env["output"] / item.get("subfolder", "") / item["filename"]
            latents[nid] = load_file(str(path))["latent_tensor"].to(torch.float32)
    return result, latents


def ids(graph: dict[str, Any], kind: str) -> list[str]:
    return sorted((k for k, n in graph.items() if n["class_type"] == kind), key=int)


def test_ab_workflow_two_lora_branches_and_only_the_lora_path_reruns(env: dict[str, Any]) -> None:
    import torch

    path = ROOT / "workflows" / "api" / "flux_model_lora_ab.json"
    graph = tiny_graph(path, env["transformer"], ["tiny-a.safetensors", "tiny-b.safetensors"])
    loader = ids(graph, "OptimizedFluxLoader")[0]
    lora_a, lora_b = ids(graph, "LoraLoaderModelOnly")
    first, latents = run(env, graph)
    a_out, b_out = ids(graph, "SaveLatent")
    assert loader in first.executed
    assert not torch.equal(latents[a_out], latents[b_out]), "the two LoRA branches gave the same latents"
    stats = env["client"].request("GET", "/fastlora/stats")
    compiles = stats["engines"][0]["compiles"]

    graph[lora_a]["inputs"]["strength_model"] = 0.5  # strength change only
    second, latents2 = run(env, graph)
    assert loader in second.cached and loader not in second.executed
    assert lora_a in second.executed and lora_b not in second.executed
    assert not torch.equal(latents2[a_out], latents[a_out])
    (a_entry,) = env["client"].request("GET", "/fastlora/stats")["engines"][0]["last_swap"]["stack"]
    assert a_entry["strength"] == 0.5

    # another file (at a strength of its own: a node whose inputs equal another node's is served from
    # ComfyUI's cache), then back to A; ComfyUI keeps only the last run's outputs, so A is sampled again
    graph[lora_a]["inputs"].update(lora_name="tiny-b.safetensors", strength_model=0.9)
    third, _ = run(env, graph)
    assert loader not in third.executed and lora_a in third.executed
    graph[lora_a]["inputs"].update(lora_name="tiny-a.safetensors", strength_model=1.0)
    fourth, latents4 = run(env, graph)
    sampler_a = graph[a_out]["inputs"]["samples"][0]
    assert loader not in fourth.executed and lora_a in fourth.executed and sampler_a in fourth.executed
    assert torch.equal(latents4[a_out], latents[a_out]), "A -> B -> A did not give A's latents back"
    after = env["client"].request("GET", "/fastlora/stats")
    # the node read A's file anew: recognised as the LoRA already converted and staged (Linux)
    if sys.platform.startswith("linux"):
        assert after["engines"][0]["last_swap"]["stack"] == [dict(a_entry, strength=1.0)]
    assert after["engines"][0]["compiles"] == compiles
    assert after["engines"][0]["source"].endswith("(transformer only)")


def test_hires_fix_workflow_runs_a_second_pass_on_the_same_model(env: dict[str, Any]) -> None:
    path = ROOT / "workflows" / "api" / "flux_model_hires_fix.json"
    graph = tiny_graph(path, env["transformer"], ["tiny-a.safetensors"], seed=100)
    result, latents = run(env, graph)
    (out,) = latents.values()
    assert list(out.shape) == [1, 16, 12, 12]  # 64 px -> 8 latent rows, upscaled 1.5x for the second pass
    assert len(ids(graph, "KSampler")) == 2 and all(k in result.executed for k in ids(graph, "KSampler"))


def test_single_lora_workflow_runs(env: dict[str, Any]) -> None:
    path = ROOT / "workflows" / "api" / "flux_model_lora.json"
    _, latents = run(env, tiny_graph(path, env["transformer"], ["tiny-b.safetensors"], seed=200))
    assert len(latents) == 1


def test_lycoris_workflow_applies_a_lokr_file_and_a_strength_change_reruns_only_its_node(env: dict[str, Any]) -> None:
    """LoRA Hotswap for MODEL, as shipped after ComfyUI's loader: a LoKr file (which ComfyUI's loaders
    cannot hand this MODEL) joins the stack, and changing its strength re-runs that node and the
    sampler only, with no compile."""
    import torch

    path = ROOT / "workflows" / "api" / "flux_model_lycoris.json"
    graph = tiny_graph(path, env["transformer"], ["tiny-a.safetensors"], seed=300, files=("tiny-lokr.safetensors",))
    loader, native, (hot,) = ids(graph, "OptimizedFluxLoader")[0], ids(graph, "LoraLoaderModelOnly")[0], \
        ids(graph, "LoraHotswapModel")
    first, latents = run(env, graph)
    assert {native, hot} <= set(first.executed)  # the loader may come from ComfyUI's cache of another test
    engine = env["client"].request("GET", "/fastlora/stats")["engines"][0]
    stack = engine["last_swap"]["stack"]
    assert [e["strength"] for e in stack] == [1.0, 0.8]
    assert stack[0]["file"].startswith("memory:") and stack[1]["file"].endswith("tiny-lokr.safetensors")
    graph[hot]["inputs"]["strength"] = 0.0  # the LoKr off: only ComfyUI's LoRA left
    second, latents2 = run(env, graph)
    assert loader not in second.executed and native not in second.executed and hot in second.executed
    assert not torch.equal(next(iter(latents2.values())), next(iter(latents.values()))), "the LoKr changed nothing"
    after = env["client"].request("GET", "/fastlora/stats")["engines"][0]
    assert [e["strength"] for e in after["last_swap"]["stack"]] == [1.0]
    assert after["compiles"] == engine["compiles"]
