"""FastLoRA's MODEL output equals ComfyUI's own UNETLoader model, LoRAs included (real ComfyUI: set
COMFYUI_DIR; skipped otherwise).

tests/comfy_model_check.py runs in a subprocess: it writes a tiny Flux that ComfyUI's UNETLoader can
load, samples the same latents with ComfyUI's KSampler code through both models (float32, CPU) and
reports, per scenario, the largest latent difference relative to the largest latent value.

Tolerance 1e-5 relative: the same float32 maths through two implementations (ComfyUI's BFL Flux
with fused qkv/linear1 matrix multiplies vs diffusers' split layers; ComfyUI merges a LoRA as one
fused delta, the engine per split layer) differs only in summation order, measured at <= 5e-7 on
this model over 2-4 steps (CFG 3 included). A real mismatch (a timestep, guidance or rope
convention, a LoRA strength or row offset) moves the latents by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run these"),
]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("comfy-model")
    out = work / "report.json"
    from test_comfyui_real import _torchvision_pythonpath

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    # ComfyUI's comfy.sd imports torchvision: the same shim as the server tests where no wheel matches torch
    env["PYTHONPATH"] = os.pathsep.join(_torchvision_pythonpath(cache) + [p for p in [env.get("PYTHONPATH", "")] if p])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "comfy_model_check.py"), COMFYUI_DIR, str(work),
                           str(out), "regional"], env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not result["errors"], result["errors"][0]
    return result


SCENARIOS = ["no_lora", "lora_bfl_1.0", "lora_bfl_0.5", "lora_bfl_-0.7", "lora_diffusers_1.0", "stack_two",
             "img2img_0.6", "cfg_3_negative", "dpmpp_2m_karras", "batch_2", "noise_mask", "size_80x48",
             "sampler_custom_advanced", "sampler_custom", "ksampler_advanced", "model_sampling_flux"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_model_output_matches_comfyui_unetloader(report: dict[str, Any], name: str) -> None:
    s = report["scenarios"][name]
    assert s["finite"]
    assert s["rel_max_diff"] <= TOLERANCE, f"{name}: {s}"


def test_model_is_configured_like_unetloader_and_loads_no_text_encoder(report: dict[str, Any]) -> None:
    assert report["model_config"] == ["Flux", "Flux"]
    assert report["model_sampling_shift"][0] == report["model_sampling_shift"][1]
    assert report["engine_modules"] == []  # transformer only: no CLIP, T5 or VAE in memory


def test_conditioning_reaches_the_sampler_in_the_model_dtype(report: dict[str, Any]) -> None:
    """Cast once when the sampler encodes it, not in every model call (a per-step copy from the CPU
    made the MODEL path 5.8 % slower than Generate on the H200)."""
    assert set(report["encoded_cond_dtypes"].values()) == {report["model_dtype"]}


def test_lora_patches_become_the_engine_stack(report: dict[str, Any]) -> None:
    sc = report["scenarios"]
    assert sc["no_lora"]["stack"] == []
    assert [e["strength"] for e in sc["lora_bfl_-0.7"]["stack"]] == [-0.7]
    assert [e["strength"] for e in sc["stack_two"]["stack"]] == [0.8, -0.6]
    assert all(e["file"].startswith("memory:") for e in sc["stack_two"]["stack"])


def test_a_b_a_is_bit_identical_without_compiling(report: dict[str, Any]) -> None:
    aba = report["aba"]
    assert aba["identical"] and aba["b_differs"] and aba["half_differs"]
    assert aba["compiles_during"] == 0
    # compiled once (regional), or loaded as saved by an earlier process (decision 40), then never again
    assert aba["compiles_total"] > 0 or aba["blocks_loaded"] > 0
    later = [report["scenarios"][n]["new_compiles"] for n in SCENARIOS if n not in ("no_lora", "batch_2",
                                                                                   "size_80x48", "cfg_3_negative")]
    assert later == [0] * len(later)


@pytest.mark.parametrize("name, words", [
    ("controlnet", ["ControlNet", "UNETLoader"]),
    ("block_patch", ["patches", "remove that node"]),
    ("torch_compile", ["TorchCompileModel", "already compiled"]),
    ("dora", ["DoRA", "plain LoRA", "LoRA Hotswap for MODEL"]),
    ("lokr", ["LoKr", "plain LoRA", "LoRA Hotswap for MODEL"]),
    ("model_merge", ["strength_model", "only takes LoRAs"]),
    ("other_family", ["another model family", "Use a Flux.1 LoRA", "LoRA Hotswap for MODEL"]),
    ("nan_lora", ["LoraFormatError", "NaN", "every image black"]),
])
def test_what_cannot_be_mapped_is_refused_with_what_to_do(report: dict[str, Any], name: str, words: list[str]) -> None:
    message = report["refusals"][name]
    assert message is not None, f"{name} was not refused"
    for w in words:
        assert w in message, message


@pytest.mark.parametrize("name", ["bfl_0.5", "mixed_with_comfyui_loader", "lokr", "dora"])
def test_lora_hotswap_for_model_matches_comfyuis_loader_on_unetloader(report: dict[str, Any], name: str) -> None:
    """FastLoRA's LoRA node for MODEL reads the file itself (any format the engine takes) and gives the
    latents ComfyUI's LoraLoaderModelOnly gives on UNETLoader's model, mixed with ComfyUI's loader too;
    no compile after the first."""
    s = report["hotswap_model"][name]
    assert s["finite"] and s["differs_from_no_lora"]
    assert s["rel_max_diff"] <= TOLERANCE, f"{name}: {s}"
    assert s["new_compiles"] == 0
    files = [e["file"] for e in s["stack"]]
    assert files and not files[-1].startswith("memory:")  # the file itself, not ComfyUI's patches
    if name == "mixed_with_comfyui_loader":
        assert files[0].startswith("memory:") and [e["strength"] for e in s["stack"]] == [0.8, -0.6]


@pytest.mark.parametrize("name, words", [
    ("hotswap_model_nan", ["LoraFormatError", "tiny-nan.safetensors", "NaN"]),
    ("hotswap_model_on_unetloader_model", ["Optimized Flux Loader", "LoraLoaderModelOnly"]),
])
def test_lora_hotswap_for_model_refuses_in_its_node(report: dict[str, Any], name: str, words: list[str]) -> None:
    message = report["refusals"][name]
    assert message is not None, f"{name} was not refused"
    for w in words:
        assert w in message, message
    assert report["usable_after_hotswap_refusals"]


def test_text_encoder_keys_of_a_lora_loader_are_left_to_the_clip(report: dict[str, Any]) -> None:
    assert report["clip_keys_ignored"]


def test_engine_keeps_working_after_refusals(report: dict[str, Any]) -> None:
    assert report["usable_after_refusals"]


def test_cancel_stops_sampling_and_the_next_run_is_unchanged(report: dict[str, Any]) -> None:
    assert report["cancel"] == {"cancelled": True, "next_run_same": True}


def test_unload_models_releases_the_engine_and_the_next_sampling_rebuilds_it(report: dict[str, Any]) -> None:
    assert report["free"] == {"released": True, "rebuilt": True, "same_image": True}
