"""workflows/*.json (UI format, drag-and-drop) and workflows/api/*.json (API format) describe the same
graphs: UI -> (node ids, class types, widget values mapped to input names, links) == API file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy_stub  # tests/ helper (pytest puts tests/ on sys.path)
import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# ComfyUI's own nodes used by the workflows, as their INPUT_TYPES declare them (nodes.py,
# comfy_extras/nodes_flux.py and nodes_sd3.py at a125cd84; sampler and scheduler lists trimmed to
# common values, file lists left to the user).
_FILES: list[str] = []
BUILTIN_SCHEMAS: dict[str, dict[str, Any]] = {
    "SaveImage": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
    "DualCLIPLoader": {"required": {"clip_name1": (_FILES, {}), "clip_name2": (_FILES, {}),
                                    "type": (["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"], {})},
                       "optional": {"device": (["default", "cpu"], {"advanced": True})}},
    "CLIPTextEncode": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}},
    "FluxGuidance": {"required": {"conditioning": ("CONDITIONING", {}),
                                  "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})}},
    "EmptySD3LatentImage": {"required": {"width": ("INT", {"min": 16, "max": 16384}),
                                         "height": ("INT", {"min": 16, "max": 16384}),
                                         "batch_size": ("INT", {"min": 1, "max": 4096})}},
    "LoraLoaderModelOnly": {"required": {"model": ("MODEL", {}), "lora_name": (_FILES, {}),
                                         "strength_model": ("FLOAT", {"min": -100.0, "max": 100.0})}},
    "KSampler": {"required": {"model": ("MODEL", {}), "seed": ("INT", {"min": 0, "control_after_generate": True}),
                              "steps": ("INT", {"min": 1, "max": 10000}), "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                              "sampler_name": (["euler", "euler_ancestral", "heun", "dpmpp_2m", "deis", "ipndm"], {}),
                              "scheduler": (["simple", "sgm_uniform", "karras", "normal", "beta"], {}),
                              "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                              "latent_image": ("LATENT", {}), "denoise": ("FLOAT", {"min": 0.0, "max": 1.0})}},
    "VAELoader": {"required": {"vae_name": (_FILES, {})}},
    "VAEDecode": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}},
    "LatentUpscaleBy": {"required": {"samples": ("LATENT", {}),
                                     "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "bislerp"], {}),
                                     "scale_by": ("FLOAT", {"min": 0.01, "max": 8.0})}},
}
BUILTIN_RETURNS = {"SaveImage": (), "DualCLIPLoader": ("CLIP",), "CLIPTextEncode": ("CONDITIONING",),
                   "FluxGuidance": ("CONDITIONING",), "EmptySD3LatentImage": ("LATENT",),
                   "LoraLoaderModelOnly": ("MODEL",), "KSampler": ("LATENT",), "VAELoader": ("VAE",),
                   "VAEDecode": ("IMAGE",), "LatentUpscaleBy": ("LATENT",)}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    comfy_stub.install(tmp_path_factory.mktemp("empty-models"))  # empty model folders
    try:
        pack = comfy_stub.load_pack()
        out = {name: cls.INPUT_TYPES() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
        out["__returns__"] = {name: cls.RETURN_TYPES for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    finally:
        comfy_stub.uninstall()
    return {**BUILTIN_SCHEMAS, **out}


def _ordered_inputs(schema: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in schema.get(section, {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return out


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name: str, kind: Any, opts: dict[str, Any]) -> bool:
    """The frontend adds a 'control_after_generate' widget (fixed/increment/...) after these."""
    if kind != "INT":
        return False
    return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def ui_to_api(ui: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    links = {link[0]: link for link in ui["links"]}
    api: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        schema = schemas[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for name, kind, opts in _ordered_inputs(schema):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(kind):  # a widget converted to an input still holds a value
                    values.pop(0)
                    if _has_control_widget(name, kind, opts):
                        values.pop(0)
            elif _is_widget(kind):
                assert values, f"node {node['id']} ({node['type']}): no widget value left for {name}"
                inputs[name] = values.pop(0)
                if _has_control_widget(name, kind, opts):
                    control = values.pop(0)
                    assert control in ("fixed", "increment", "decrement", "randomize"), control
        assert not values, f"node {node['id']} ({node['type']}): unused widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_every_ui_workflow_has_an_api_twin() -> None:
    assert len(UI_FILES) >= 5
    assert sorted(p.name for p in UI_FILES) == sorted(p.name for p in API_DIR.glob("*.json"))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid_for_drag_and_drop(path: Path) -> None:
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)) and ui["last_node_id"] >= max(ids)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order", "flags"):
            assert key in n, f"{path.name}: node {n.get('id')} lacks {key}"
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"{path.name}: link {link_id} not wired both ways"
        assert out["type"] == inp["type"] == kind
    for n in ui["nodes"]:  # no dangling references
        for inp in n["inputs"]:
            assert inp["link"] is None or any(link[0] == inp["link"] for link in ui["links"])


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_describe_the_same_graph(path: Path, schemas: dict[str, dict[str, Any]]) -> None:
    ui = json.loads(path.read_text())
    api = json.loads((API_DIR / path.name).read_text())
    stripped = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
    assert ui_to_api(ui, schemas) == stripped


@pytest.mark.parametrize("path", sorted(API_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_api_workflow_is_runnable(path: Path, schemas: dict[str, dict[str, Any]]) -> None:
    """What ComfyUI's /prompt validation checks, except the model-file dropdowns (examples name files the
    user picks): an output node, links to existing outputs of the right type, every input present,
    combo values allowed, numbers in range."""
    api = json.loads(path.read_text())
    returns = schemas["__returns__"] | BUILTIN_RETURNS
    assert any(n["class_type"] in OUTPUT_NODES for n in api.values()), "API graphs need an output node"
    file_inputs = {"diffusers_model", "transformer", "clip_l", "t5xxl", "vae", "lora_name", "lora_1", "lora_2",
                   "lora_3", "lora_4", "clip_name1", "clip_name2", "vae_name"}
    for nid, node in api.items():
        schema = schemas[node["class_type"]]
        for name, kind, opts in _ordered_inputs(schema):
            assert name in node["inputs"] or name in schema.get("optional", {}), f"{nid}: {name} missing"
            value = node["inputs"].get(name)
            if isinstance(value, list):
                src = api[value[0]]
                assert returns[src["class_type"]][value[1]] == kind, f"{nid}.{name}: wrong link type"
            elif isinstance(kind, list) and name not in file_inputs:
                assert value in kind, f"{nid}.{name}={value!r} not in {kind}"
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{nid}.{name}={value}"
        assert set(node["inputs"]) <= {n for n, _, _ in _ordered_inputs(schema)}, f"{nid}: unknown inputs"


# -- what ships beside the graphs: generated files, notes, template-browser thumbnails ----------------
FILE_INPUTS = {"diffusers_model", "transformer", "clip_l", "t5xxl", "vae", "lora_name", "lora_1", "lora_2",
               "lora_3", "lora_4"}
# What the OptimizedFluxLoader reads per source (nodes/flux_nodes.py SOURCE_INPUTS).
SOURCE_READS = {"diffusers folder": {"diffusers_model"}, "single files": {"transformer", "clip_l", "t5xxl", "vae"}}
# Folder names ComfyUI's template browser lists (app/custom_node_manager.py; workflows/ is one of them).
TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]


def test_workflows_are_what_tools_make_workflows_writes(tmp_path: Path) -> None:
    """Edits go into tools/make_workflows.py: every shipped graph, API twin and thumbnail is its output."""
    import subprocess
    import sys

    from PIL import Image, ImageChops, ImageStat

    subprocess.run([sys.executable, str(ROOT / "tools" / "make_workflows.py"), str(tmp_path)], check=True)
    made = sorted(p.relative_to(tmp_path / "workflows") for p in (tmp_path / "workflows").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(ROOT / "workflows") for p in (ROOT / "workflows").rglob("*") if p.is_file())
    assert made == shipped
    for rel in made:
        new, old = tmp_path / "workflows" / rel, ROOT / "workflows" / rel
        if rel.suffix == ".json":
            assert new.read_text() == old.read_text(), f"{rel} differs: run tools/make_workflows.py"
        else:  # JPEG bytes may differ between Pillow versions; the picture may not
            with Image.open(new) as a, Image.open(old) as b:
                assert a.size == b.size
                diff = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean
                assert max(diff) < 3, f"{rel} differs: run tools/make_workflows.py"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_every_file_a_workflow_names_is_listed_in_its_note(path: Path) -> None:
    """A user who opens a template sees which model files it expects (the graph is refused until they
    exist); the loader's inputs that its source does not read name nothing."""
    ui = json.loads(path.read_text())
    note = "\n".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "MarkdownNote")
    api = json.loads((API_DIR / path.name).read_text())
    for nid, node in api.items():
        inputs = node["inputs"]
        if node["class_type"] == "OptimizedFluxLoader":
            for name in FILE_INPUTS & set(inputs) - SOURCE_READS[inputs["source"]]:
                assert inputs[name] == "None", f"{path.name}: node {nid} names {name}={inputs[name]!r} unused"
        for name in FILE_INPUTS & set(inputs):
            value = inputs[name]
            if isinstance(value, str) and value != "None":
                assert f"/{value}`" in note, f"{path.name}: {value} is not in the note"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_every_workflow_has_a_thumbnail(path: Path) -> None:
    from PIL import Image

    jpg = path.with_suffix(".jpg")  # the browser asks for /api/workflow_templates/<pack>/<name>.jpg
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.size == (512, 512)
        assert len(im.convert("L").getcolors(256) or []) > 16, "blank thumbnail"


def test_templates_are_listed_once() -> None:
    """ComfyUI lists the JSON files of every template folder it knows: a second folder holding the same
    graphs would show each template twice in the browser."""
    holding = [name for name in TEMPLATE_FOLDERS if list((ROOT / name).glob("*.json"))]
    assert holding == ["workflows"]


@pytest.mark.parametrize("path", sorted(API_DIR.glob("flux_model_*.json")), ids=lambda p: p.stem)
def test_model_workflows_sample_the_loader_model_through_lora_loaders(path: Path) -> None:
    """The MODEL-path graphs: transformer-only loader, its MODEL output (slot 1) through a chain of
    LoRA loaders (ComfyUI's LoraLoaderModelOnly first, FastLoRA's LoraHotswapModel after it) into every
    KSampler; text and VAE from ComfyUI's own nodes, no Generate."""
    api = json.loads(path.read_text())
    kinds = {n["class_type"] for n in api.values()}
    assert "Generate" not in kinds and {"DualCLIPLoader", "VAELoader", "KSampler"} <= kinds
    loaders = [nid for nid, n in api.items() if n["class_type"] == "OptimizedFluxLoader"]
    assert len(loaders) == 1 and api[loaders[0]]["inputs"]["components"] == "transformer only (MODEL)"
    samplers = [n for n in api.values() if n["class_type"] == "KSampler"]
    assert samplers
    for ks in samplers:
        chain, src = [], ks["inputs"]["model"]
        while src[0] != loaders[0]:
            node = api[src[0]]
            chain.append(node["class_type"])
            src = node["inputs"]["model"]
        assert src == [loaders[0], 1]
        assert chain and chain[-1] == "LoraLoaderModelOnly"
        assert set(chain) <= {"LoraLoaderModelOnly", "LoraHotswapModel"}


@pytest.mark.parametrize("path", sorted(p for p in API_DIR.glob("*.json") if not p.stem.startswith("flux_model_")),
                         ids=lambda p: p.stem)
def test_tiny_overrides_point_every_workflow_at_the_tiny_model(path: Path) -> None:
    """``headless --tiny`` (the README's smoke path) leaves no node naming a file the tiny tree lacks
    and keeps each loader's source (the 24 GB workflow then reads the tiny single files)."""
    from fastlora_core import headless, tiny, tiny_names

    assert tiny_names.TINY_LORA_NAMES == tuple(tiny.TINY_LORAS)
    graph = headless.load_workflow(path)
    smoke = headless.apply_overrides(graph, headless.tiny_overrides(graph))
    tiny_files = {file for _folder, file in tiny_names.TINY_SINGLE_FILES.values()}
    loras = {f"{name}.safetensors" for name in tiny_names.TINY_LORA_NAMES} | {"None"}
    for nid, node in smoke.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "OptimizedFluxLoader":
            assert inputs["source"] == graph[nid]["inputs"]["source"]
            assert inputs["diffusers_model"] == tiny_names.TINY_DIFFUSERS_NAME
            assert {inputs[k] for k in ("transformer", "clip_l", "t5xxl", "vae")} == tiny_files
            assert (inputs["quantization"], inputs["compile"], inputs["dtype"]) == ("none", "off", "float32")
        elif kind in ("LoraHotswap", "PadDummyLora"):
            assert {v for k, v in inputs.items() if k.startswith("lora_")} <= loras
        elif kind == "Generate":
            assert (inputs["width"], inputs["height"], inputs["steps"]) == (64, 64, 2)


@pytest.mark.parametrize("path", sorted(API_DIR.glob("flux_model_*.json")), ids=lambda p: p.stem)
def test_tiny_refuses_model_path_workflows_with_what_to_do(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's smoke loop must not die on a MODEL-path graph with a late ComfyUI validation error:
    ``--tiny`` says at once why it cannot run it (ComfyUI's own CLIP/VAE loaders) and what to do."""
    from fastlora_core import headless

    rc = headless.main([str(path), "--tiny", "--server", "127.0.0.1:9", "--print-prompt"])
    err = capsys.readouterr().err
    assert rc == headless.EXIT_REFUSED
    assert "DualCLIPLoader" in err and "VAELoader" in err and "real clip_l, t5xxl and ae" in err


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_no_node_overlaps_another(path: Path) -> None:
    """Nodes drawn at their stored size never cover each other (Generate's live preview needs its
    height: issue 16, a preview grew the node over the neighbouring branch)."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in json.loads(path.read_text())["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"nodes {a[0]} and {b[0]} overlap in {path.name}"
