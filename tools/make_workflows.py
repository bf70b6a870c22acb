"""Generates workflows/*.json (UI, version 0.4), workflows/api/*.json and the template browser's
thumbnails workflows/*.jpg (a diagram of each graph, drawn here; not a generated image) from one
description."""
import json
import sys
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Usage: python tools/make_workflows.py [REPO_ROOT]   (default: the repository this file is in)
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
LOADER_KEYS = ["source", "diffusers_model", "transformer", "clip_l", "t5xxl", "vae", "quantization",
               "t5_quantization", "attention", "compile", "offload", "dtype", "swap_strategy", "max_rank"]
GEN_KEYS = ["prompt", "seed", "steps", "guidance", "width", "height", "batch"]
PAD_KEYS = ["target", "lora_1", "lora_2", "lora_3", "lora_4", "max_rank"]
OUT = {"OptimizedFluxLoader": [("engine", "FASTLORA_ENGINE")], "LoraHotswap": [("engine", "FASTLORA_ENGINE")],
       "PadDummyLora": [("engine", "FASTLORA_ENGINE")], "Generate": [("images", "IMAGE")], "SaveImage": []}
LINK_IN = {"LoraHotswap": [("engine", "FASTLORA_ENGINE")], "PadDummyLora": [("engine", "FASTLORA_ENGINE")],
           "Generate": [("engine", "FASTLORA_ENGINE")], "SaveImage": [("images", "IMAGE")],
           "OptimizedFluxLoader": []}
SIZES = {"OptimizedFluxLoader": [340, 430], "LoraHotswap": [320, 110], "PadDummyLora": [320, 230],
         "Generate": [340, 330], "SaveImage": [300, 320]}


def loader(**kw):
    d = {"source": "diffusers folder", "diffusers_model": "FLUX.1-dev", "transformer": "None", "clip_l": "None",
         "t5xxl": "None", "vae": "None", "quantization": "auto", "t5_quantization": "auto", "attention": "auto",
         "compile": "regional", "offload": "none", "dtype": "bfloat16", "swap_strategy": "fused", "max_rank": 128}
    d.update(kw)
    return d


def gen(**kw):
    d = {"prompt": "a photo of a red fox in a snowy forest, golden hour", "seed": 42, "steps": 28,
         "guidance": 3.5, "width": 1024, "height": 1024, "batch": 1}
    d.update(kw)
    return d


def widgets(t, w):
    if t == "OptimizedFluxLoader":
        return [w[k] for k in LOADER_KEYS]
    if t == "LoraHotswap":
        return [w["lora_name"], w["strength"]]
    if t == "PadDummyLora":
        return [w[k] for k in PAD_KEYS]
    if t == "Generate":
        v = [w[k] for k in GEN_KEYS]
        return v[:2] + ["fixed"] + v[2:]
    if t == "SaveImage":
        return [w["filename_prefix"]]
    raise KeyError(t)


# Inputs that name a model file the user must have, and where ComfyUI looks for it. The loader reads
# only the inputs of its `source` (the others stay "None" in shipped graphs).
FILE_INPUTS = {"diffusers_model": "models/diffusers", "transformer": "models/diffusion_models",
               "clip_l": "models/text_encoders", "t5xxl": "models/text_encoders", "vae": "models/vae",
               "lora_name": "models/loras", "lora_1": "models/loras", "lora_2": "models/loras",
               "lora_3": "models/loras", "lora_4": "models/loras"}


def named_files(nodes):
    """(input, value, folder) for every model file the graph names, in node order, without repeats."""
    out = []
    for _nid, _t, _pos, w in nodes:
        for key, folder in FILE_INPUTS.items():
            value = w.get(key, "None")
            if value != "None" and (key, value, folder) not in out:
                out.append((key, value, folder))
    return out


def files_note(nodes):
    lines = [f"- `{folder}/{value}`" for _key, value, folder in named_files(nodes)]
    return ("**Files this graph names** (examples: nothing is downloaded; pick your own files in these "
            "nodes, or the graph is refused with the name of the missing file):\n" + "\n".join(lines))


def thumbnail(path, title, nodes, links):
    """A 512x512 diagram of the graph: one box per node (columns and rows follow the canvas layout),
    links as lines, the workflow's title above."""
    size, margin, top = 512, 24, 100
    img = Image.new("RGB", (size, size), (32, 33, 38))
    draw = ImageDraw.Draw(img)
    title_font, node_font, small_font = (ImageFont.load_default(size=s) for s in (28, 16, 12))
    draw.text((margin, 14), "FastLoRA", font=small_font, fill=(170, 175, 110))
    lines = [""]
    for word in title.replace("FastLoRA: ", "").split():  # wrap the title to the width
        trial = f"{lines[-1]} {word}".strip()
        lines[-1:] = [lines[-1], word] if draw.textlength(trial, font=title_font) > size - 2 * margin else [trial]
    for i, line in enumerate(lines[:2]):
        draw.text((margin, 32 + 32 * i), line, font=title_font, fill=(235, 235, 235))
    cols = sorted({pos[0] for _n, _t, pos, _w in nodes})
    rows = sorted({pos[1] for _n, _t, pos, _w in nodes})
    col_w, row_h = (size - 2 * margin) / len(cols), 120
    box_w, box_h = col_w - 16, 74
    y0 = top + (size - top - margin - box_h - row_h * (len(rows) - 1)) / 2
    place = {nid: (margin + cols.index(pos[0]) * col_w, y0 + rows.index(pos[1]) * row_h)
             for nid, _t, pos, _w in nodes}
    for src, dst in links:
        (xa, ya), (xb, yb) = place[src], place[dst]
        if xa == xb:  # chained nodes stacked in one column: a vertical link
            draw.line([(xa + box_w / 2, ya + box_h), (xb + box_w / 2, yb)], fill=(170, 175, 110), width=3)
            continue
        mid = xb - 8
        draw.line([(xa + box_w, ya + box_h / 2), (mid, ya + box_h / 2), (mid, yb + box_h / 2), (xb, yb + box_h / 2)],
                  fill=(170, 175, 110), width=3)
    colours = {"OptimizedFluxLoader": (70, 90, 150), "LoraHotswap": (120, 70, 140), "PadDummyLora": (140, 90, 60),
               "Generate": (60, 120, 90), "SaveImage": (80, 80, 80)}
    labels = {"OptimizedFluxLoader": "Loader", "LoraHotswap": "LoRA", "PadDummyLora": "Pad slot",
              "Generate": "Generate", "SaveImage": "Save"}
    for nid, t, _pos, w in nodes:
        x, y = place[nid]
        detail = {"OptimizedFluxLoader": [w.get("source", "")], "LoraHotswap": [f"strength {w.get('strength')}"],
                  "PadDummyLora": [w.get("target", "")], "Generate": [f"{w.get('steps')} steps"],
                  "SaveImage": ["image"]}[t]
        if t == "OptimizedFluxLoader" and w.get("swap_strategy") != "fused":
            detail.append(w["swap_strategy"])
        draw.rounded_rectangle([x, y, x + box_w, y + box_h], radius=8, fill=colours[t], outline=(220, 220, 220))
        draw.text((x + 7, y + 8), labels[t], font=node_font, fill=(255, 255, 255))
        for i, text in enumerate(detail):
            while draw.textlength(text, font=small_font) > box_w - 12:
                text = text[:-2] + "…"
            draw.text((x + 7, y + 34 + 16 * i), text, font=small_font, fill=(225, 225, 225))
    draw.text((margin, size - 22), "diagram of the workflow", font=small_font, fill=(140, 140, 140))
    img.save(path, "JPEG", quality=90)


def build(name, title, note, nodes, links):
    """nodes: list of (id, type, pos, widgets); links: list of (from_id, to_id) (slot 0 -> slot 0)."""
    ui_nodes, api, ui_links = [], {}, []
    by_id = {n[0]: n for n in nodes}
    out_links = {n[0]: [] for n in nodes}
    in_link = {}
    for lid, (src, dst) in enumerate(links, start=1):
        stype = OUT[by_id[src][1]][0][1]
        ui_links.append([lid, src, 0, dst, 0, stype])
        out_links[src].append(lid)
        in_link[dst] = (lid, src)
    for order, (nid, t, pos, w) in enumerate(nodes):
        inputs = []
        for iname, itype in LINK_IN[t]:
            inputs.append({"name": iname, "type": itype, "link": in_link[nid][0] if nid in in_link else None})
        outputs = []
        for oname, otype in OUT[t]:
            outputs.append({"name": oname, "type": otype, "links": out_links[nid], "slot_index": 0})
        ui_nodes.append({"id": nid, "type": t, "pos": pos, "size": SIZES[t], "flags": {}, "order": order,
                         "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": t}, "widgets_values": widgets(t, w)})
        api_inputs = dict(w)
        if nid in in_link:
            api_inputs[LINK_IN[t][0][0]] = [str(in_link[nid][1]), 0]
        api[str(nid)] = {"class_type": t, "inputs": api_inputs, "_meta": {"title": t}}
    note_id = max(by_id) + 1
    ui_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [40, -340], "size": [760, 300], "flags": {},
                     "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                     "properties": {}, "widgets_values": [f"## {title}\n\n{note}\n\n{files_note(nodes)}"],
                     "color": "#432", "bgcolor": "#653"})
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "fastlora/" + name)), "revision": 0,
          "last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": ui_links,
          "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [60, 300]}}, "version": 0.4}
    (ROOT / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
    thumbnail(ROOT / "workflows" / f"{name}.jpg", title, nodes, links)
    (ROOT / "workflows" / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")


COMMON = ("Pick your Flux model in the loader and your LoRAs in the LoRA nodes. Changing only a LoRA or its "
          "strength re-runs LoraHotswap and Generate: the weights are swapped in place (milliseconds), the "
          "model is neither reloaded nor recompiled.")

build("flux_lora_basic", "FastLoRA: Flux + one LoRA",
      COMMON + " The first run loads and compiles the model (compile = regional); later runs reuse it.",
      [(1, "OptimizedFluxLoader", [40, 0], loader()),
       (2, "LoraHotswap", [420, 0], {"lora_name": "my_flux_lora.safetensors", "strength": 1.0}),
       (3, "Generate", [780, 0], gen()),
       (4, "SaveImage", [1160, 0], {"filename_prefix": "FastLoRA"})],
      [(1, 2), (2, 3), (3, 4)])

build("flux_lora_ab", "FastLoRA: A/B two LoRAs in one graph",
      COMMON + " Both branches share one compiled engine; each Generate swaps to its own LoRA right before it "
      "samples, so the two images differ only by the LoRA (same seed).",
      [(1, "OptimizedFluxLoader", [40, 0], loader()),
       (2, "LoraHotswap", [420, 0], {"lora_name": "lora_a.safetensors", "strength": 1.0}),
       (3, "LoraHotswap", [420, 420], {"lora_name": "lora_b.safetensors", "strength": 1.0}),
       (4, "Generate", [780, 0], gen()),
       (5, "Generate", [780, 420], gen()),
       (6, "SaveImage", [1160, 0], {"filename_prefix": "FastLoRA_A"}),
       (7, "SaveImage", [1160, 420], {"filename_prefix": "FastLoRA_B"})],
      [(1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)])

build("flux_lora_stack", "FastLoRA: a stack of two LoRAs",
      COMMON + " Chain LoraHotswap nodes to stack LoRAs; each has its own strength (0 disables it).",
      [(1, "OptimizedFluxLoader", [40, 0], loader()),
       (2, "LoraHotswap", [420, 0], {"lora_name": "style_lora.safetensors", "strength": 0.8}),
       (3, "LoraHotswap", [420, 160], {"lora_name": "character_lora.safetensors", "strength": 0.6}),
       (4, "Generate", [780, 0], gen()),
       (5, "SaveImage", [1160, 0], {"filename_prefix": "FastLoRA_stack"})],
      [(1, 2), (2, 3), (3, 4), (4, 5)])

build("flux_24gb_consumer", "FastLoRA: 24 GB consumer GPU recipe",
      "Single files as most ComfyUI users have them (models/diffusion_models, models/text_encoders, models/vae). "
      "fp8 transformer weights (GPUs with compute capability 8.9+, e.g. RTX 4090; else fp8_weight_only), "
      "T5 in NF4 (saves ~7 GB) and regional compile. swap_strategy = adapter (the published recipe) needs "
      "no bf16 master copy; with 32 GB+ free system RAM, fused has no per-step LoRA cost. t5_quantization and "
      "swap_strategy are among the loader's advanced options (newer ComfyUI front ends fold them into the "
      "node's advanced section). " + COMMON,
      [(1, "OptimizedFluxLoader", [40, 0], loader(
          source="single files", diffusers_model="None", transformer="flux1-dev.safetensors",
          clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors", vae="ae.safetensors",
          quantization="fp8", t5_quantization="nf4", swap_strategy="adapter")),
       (2, "LoraHotswap", [420, 0], {"lora_name": "my_flux_lora.safetensors", "strength": 1.0}),
       (3, "Generate", [780, 0], gen()),
       (4, "SaveImage", [1160, 0], {"filename_prefix": "FastLoRA_24GB"})],
      [(1, 2), (2, 3), (3, 4)])

build("flux_pad_dummy_lora", "FastLoRA: adapter slot for several LoRAs (PadDummyLora)",
      "swap_strategy = adapter keeps LoRA layers at a fixed rank on fixed layers. PadDummyLora prepares one slot "
      "covering every LoRA listed in it (or all Flux layers), so switching between them never recompiles. "
      + COMMON,
      [(1, "OptimizedFluxLoader", [40, 0], loader(swap_strategy="adapter", max_rank=64)),
       (2, "PadDummyLora", [420, 0], {"target": "listed LoRAs", "lora_1": "lora_a.safetensors",
                                      "lora_2": "lora_b.safetensors", "lora_3": "lora_c.safetensors",
                                      "lora_4": "None", "max_rank": 0}),
       (3, "LoraHotswap", [780, 0], {"lora_name": "lora_a.safetensors", "strength": 1.0}),
       (4, "LoraHotswap", [780, 420], {"lora_name": "lora_b.safetensors", "strength": 1.0}),
       (5, "Generate", [1140, 0], gen()),
       (6, "Generate", [1140, 420], gen()),
       (7, "SaveImage", [1520, 0], {"filename_prefix": "FastLoRA_pad_A"}),
       (8, "SaveImage", [1520, 420], {"filename_prefix": "FastLoRA_pad_B"})],
      [(1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8)])
