"""The graphs ``benchmarks/bench_server.py`` queues (no ComfyUI needed): the ``ours_model_workflow`` path
must run the shipped MODEL workflow as a user would, changing only the files, LoRA, seed and prompt."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_server

ROOT = Path(__file__).resolve().parents[1]
FILES = {"transformer": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_bf16.safetensors",
         "vae": "ae.safetensors", "t5xxl_fp8": "t5xxl_fp8_e4m3fn.safetensors", "loras": ["lora_a.safetensors", "lora_b.safetensors"]}


def test_the_workflow_path_is_the_shipped_model_workflow_with_this_runs_files() -> None:
    shipped = json.loads((ROOT / "workflows" / "api" / "flux_model_lora.json").read_text())
    graph = bench_server.graph_for("ours_model_workflow", FILES, "lora_b.safetensors", 0.6, 7, False,
                                   "a new prompt")
    assert graph.keys() == shipped.keys()
    by_class = {n["class_type"]: n["inputs"] for n in graph.values()}
    assert by_class["OptimizedFluxLoader"]["transformer"] == "flux1-dev.safetensors"
    assert (by_class["DualCLIPLoader"]["clip_name1"], by_class["DualCLIPLoader"]["clip_name2"]) == \
        ("clip_l.safetensors", "t5xxl_bf16.safetensors")
    assert by_class["VAELoader"]["vae_name"] == "ae.safetensors"
    assert (by_class["LoraLoaderModelOnly"]["lora_name"], by_class["LoraLoaderModelOnly"]["strength_model"]) == \
        ("lora_b.safetensors", 0.6)
    assert by_class["KSampler"]["seed"] == 7
    texts = sorted(n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode")
    assert texts == ["", "a new prompt"]  # the negative stays empty
    assert "SaveImage" not in by_class and by_class["PreviewImage"] == {"images": ["10", 0]}
    # everything else exactly as shipped: the loader's options, the sampler, the links
    for node_id, node in shipped.items():
        if node["class_type"] in ("OptimizedFluxLoader", "KSampler", "FluxGuidance", "EmptySD3LatentImage"):
            changed = {k for k, v in node["inputs"].items() if graph[node_id]["inputs"][k] != v}
            assert changed <= {"transformer", "seed"}, (node["class_type"], changed)


def test_the_workflow_path_changes_the_prompt_each_cycle() -> None:
    prompts = {bench_server.OTHER_PROMPT.format(cycle) for cycle in range(3)}
    assert len(prompts) == 3 and bench_server.PROMPT not in prompts


def test_the_fp8_t5_path_differs_only_in_the_t5_file() -> None:
    bf16, fp8 = (bench_server.graph_for(path, FILES, "lora_a.safetensors", 1.0, 1, False)
                 for path in ("ours_model_workflow", "ours_model_workflow_t5fp8"))
    clip = next(k for k, n in fp8.items() if n["class_type"] == "DualCLIPLoader")
    assert fp8[clip]["inputs"]["clip_name2"] == "t5xxl_fp8_e4m3fn.safetensors"
    fp8[clip]["inputs"]["clip_name2"] = bf16[clip]["inputs"]["clip_name2"]
    assert fp8 == bf16
