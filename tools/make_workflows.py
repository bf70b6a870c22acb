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
               "t5_quantization", "attention", "compile", "offload", "dtype", "swap_strategy", "max_rank",
               "components", "deterministic"]
COMPONENTS_ALL = "everything (Generate + MODEL)"
COMPONENTS_TRANSFORMER = "transformer only (MODEL)"
GEN_KEYS = ["prompt", "seed", "steps", "guidance", "width", "height", "batch"]
PAD_KEYS = ["target", "lora_1", "lora_2", "lora_3", "lora_4", "max_rank"]
OUT = {"OptimizedFluxLoader": [("engine", "FASTLORA_ENGINE"), ("model", "MODEL")],
       "LoraHotswap": [("engine", "FASTLORA_ENGINE")], "LoraHotswapModel": [("model", "MODEL")],
       "PadDummyLora": [("engine", "FASTLORA_ENGINE")], "Generate": [("images", "IMAGE")], "SaveImage": [],
       # ComfyUI's own nodes used by the MODEL workflows
       "DualCLIPLoader": [("CLIP", "CLIP")], "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
       "FluxGuidance": [("CONDITIONING", "CONDITIONING")], "EmptySD3LatentImage": [("LATENT", "LATENT")],
       "LoraLoaderModelOnly": [("MODEL", "MODEL")], "KSampler": [("LATENT", "LATENT")],
       "VAELoader": [("VAE", "VAE")], "VAEDecode": [("IMAGE", "IMAGE")], "LatentUpscaleBy": [("LATENT", "LATENT")]}
LINK_IN = {"LoraHotswap": [("engine", "FASTLORA_ENGINE")], "PadDummyLora": [("engine", "FASTLORA_ENGINE")],
           "Generate": [("engine", "FASTLORA_ENGINE")], "SaveImage": [("images", "IMAGE")],
           "OptimizedFluxLoader": [], "DualCLIPLoader": [], "CLIPTextEncode": [("clip", "CLIP")],
           "FluxGuidance": [("conditioning", "CONDITIONING")], "EmptySD3LatentImage": [],
           "LoraLoaderModelOnly": [("model", "MODEL")], "LoraHotswapModel": [("model", "MODEL")],
           "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")],
           "VAELoader": [], "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
           "LatentUpscaleBy": [("samples", "LATENT")]}
# Generate is tall enough for its live preview: ComfyUI's front end (1.27) draws the preview widget at least
# 220 px high below the widgets, whatever the image size, so branches below it start lower.
SIZES = {"OptimizedFluxLoader": [340, 460], "LoraHotswap": [320, 110], "LoraHotswapModel": [320, 110], "PadDummyLora": [320, 230],
         "Generate": [340, 560], "SaveImage": [300, 320], "DualCLIPLoader": [320, 130],
         "CLIPTextEncode": [400, 200], "FluxGuidance": [320, 60], "EmptySD3LatentImage": [320, 110],
         "LoraLoaderModelOnly": [320, 85], "KSampler": [320, 270], "VAELoader": [320, 60], "VAEDecode": [210, 50],
         "LatentUpscaleBy": [320, 85]}
# widget order in the UI (the frontend adds a "fixed"/"randomize" control after seeds)
WIDGETS = {"LoraHotswap": ["lora_name", "strength"], "LoraHotswapModel": ["lora_name", "strength"],
           "SaveImage": ["filename_prefix"], "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
           "CLIPTextEncode": ["text"], "FluxGuidance": ["guidance"],
           "EmptySD3LatentImage": ["width", "height", "batch_size"], "LoraLoaderModelOnly": ["lora_name", "strength_model"],
           "KSampler": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], "VAELoader": ["vae_name"],
           "VAEDecode": [], "LatentUpscaleBy": ["upscale_method", "scale_by"]}


def loader(**kw):
    d = {"source": "diffusers folder", "diffusers_model": "FLUX.1-dev", "transformer": "None", "clip_l": "None",
         "t5xxl": "None", "vae": "None", "quantization": "auto", "t5_quantization": "auto", "attention": "auto",
         "compile": "regional", "offload": "none", "dtype": "bfloat16", "swap_strategy": "fused", "max_rank": 128,
         "components": COMPONENTS_ALL, "deterministic": False}
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
    if t == "PadDummyLora":
        return [w[k] for k in PAD_KEYS]
    if t == "Generate":
        v = [w[k] for k in GEN_KEYS]
        return v[:2] + ["fixed"] + v[2:]
    if t == "KSampler":
        v = [w[k] for k in WIDGETS[t]]
        return v[:1] + ["fixed"] + v[1:]
    return [w[k] for k in WIDGETS[t]]


# Inputs that name a model file the user must have, and where ComfyUI looks for it. The loader reads
# only the inputs of its `source` (the others stay "None" in shipped graphs).
FILE_INPUTS = {"diffusers_model": "models/diffusers", "transformer": "models/diffusion_models",
               "clip_l": "models/text_encoders", "t5xxl": "models/text_encoders", "vae": "models/vae",
               "lora_name": "models/loras", "lora_1": "models/loras", "lora_2": "models/loras",
               "lora_3": "models/loras", "lora_4": "models/loras", "clip_name1": "models/text_encoders",
               "clip_name2": "models/text_encoders", "vae_name": "models/vae"}


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
    for link in links:
        src, dst = link[0], link[-2] if len(link) == 4 else link[1]
        (xa, ya), (xb, yb) = place[src], place[dst]
        if xa == xb:  # chained nodes stacked in one column: a vertical link
            draw.line([(xa + box_w / 2, ya + box_h), (xb + box_w / 2, yb)], fill=(170, 175, 110), width=3)
            continue
        mid = xb - 8
        draw.line([(xa + box_w, ya + box_h / 2), (mid, ya + box_h / 2), (mid, yb + box_h / 2), (xb, yb + box_h / 2)],
                  fill=(170, 175, 110), width=3)
    colours = {"OptimizedFluxLoader": (70, 90, 150), "LoraHotswap": (120, 70, 140), "PadDummyLora": (140, 90, 60),
               "Generate": (60, 120, 90), "SaveImage": (80, 80, 80), "LoraLoaderModelOnly": (120, 70, 140),
               "LoraHotswapModel": (120, 70, 140), "KSampler": (60, 120, 90)}
    labels = {"OptimizedFluxLoader": "Loader", "LoraHotswap": "LoRA", "PadDummyLora": "Pad slot",
              "Generate": "Generate", "SaveImage": "Save", "DualCLIPLoader": "CLIP", "CLIPTextEncode": "Text",
              "FluxGuidance": "Guidance", "EmptySD3LatentImage": "Latent", "LoraLoaderModelOnly": "LoRA (native)",
              "LoraHotswapModel": "LoRA file (FastLoRA)",
              "KSampler": "KSampler", "VAELoader": "VAE", "VAEDecode": "Decode", "LatentUpscaleBy": "Upscale"}
    for nid, t, _pos, w in nodes:
        x, y = place[nid]
        detail = {"OptimizedFluxLoader": [w.get("source", "")], "LoraHotswap": [f"strength {w.get('strength')}"],
                  "LoraHotswapModel": [f"strength {w.get('strength')}"],
                  "PadDummyLora": [w.get("target", "")], "Generate": [f"{w.get('steps')} steps"],
                  "SaveImage": ["image"], "LoraLoaderModelOnly": [f"strength {w.get('strength_model')}"],
                  "KSampler": [f"{w.get('steps')} steps, denoise {w.get('denoise')}"],
                  "LatentUpscaleBy": [f"x{w.get('scale_by')}"]}.get(t, [])
        if t == "OptimizedFluxLoader" and w.get("components") == COMPONENTS_TRANSFORMER:
            detail.append("MODEL output")
        if t == "OptimizedFluxLoader" and w.get("swap_strategy") != "fused":
            detail.append(w["swap_strategy"])
        draw.rounded_rectangle([x, y, x + box_w, y + box_h], radius=8, fill=colours.get(t, (80, 80, 80)),
                               outline=(220, 220, 220))
        draw.text((x + 7, y + 8), labels[t], font=node_font, fill=(255, 255, 255))
        for i, text in enumerate(detail):
            while draw.textlength(text, font=small_font) > box_w - 12:
                text = text[:-2] + "…"
            draw.text((x + 7, y + 34 + 16 * i), text, font=small_font, fill=(225, 225, 225))
    draw.text((margin, size - 22), "diagram of the workflow", font=small_font, fill=(140, 140, 140))
    img.save(path, "JPEG", quality=90)


def build(name, title, note, nodes, links):
    """nodes: list of (id, type, pos, widgets); links: (from_id, to_id) joins output 0 to the first linked
    input, (from_id, from_slot, to_id, input_name) any output to a named input."""
    ui_nodes, api, ui_links = [], {}, []
    by_id = {n[0]: n for n in nodes}
    out_links = {(n[0], s): [] for n in nodes for s in range(len(OUT[n[1]]))}
    in_link = {}  # (dst, input name) -> (link id, src, src slot)
    for lid, link in enumerate(links, start=1):
        src, slot, dst, iname = link if len(link) == 4 else (link[0], 0, link[1], LINK_IN[by_id[link[1]][1]][0][0])
        stype = OUT[by_id[src][1]][slot][1]
        names = [n for n, _ in LINK_IN[by_id[dst][1]]]
        ui_links.append([lid, src, slot, dst, names.index(iname), stype])
        out_links[(src, slot)].append(lid)
        in_link[(dst, iname)] = (lid, src, slot)
    for order, (nid, t, pos, w) in enumerate(nodes):
        inputs = []
        for iname, itype in LINK_IN[t]:
            found = in_link.get((nid, iname))
            inputs.append({"name": iname, "type": itype, "link": found[0] if found else None})
        outputs = []
        for slot, (oname, otype) in enumerate(OUT[t]):
            outputs.append({"name": oname, "type": otype, "links": out_links[(nid, slot)], "slot_index": slot})
        ui_nodes.append({"id": nid, "type": t, "pos": pos, "size": SIZES[t], "flags": {}, "order": order,
                         "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": t}, "widgets_values": widgets(t, w)})
        api_inputs = dict(w)
        for iname, _ in LINK_IN[t]:
            found = in_link.get((nid, iname))
            if found:
                api_inputs[iname] = [str(found[1]), found[2]]
        api[str(nid)] = {"class_type": t, "inputs": api_inputs, "_meta": {"title": t}}
    note_id = max(by_id) + 1
    top = min(pos[1] for _nid, _t, pos, _w in nodes)  # the note sits 40 px above the highest node
    ui_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [40, min(0, top) - 340], "size": [760, 300],
                     "flags": {},
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
       (3, "LoraHotswap", [420, 640], {"lora_name": "lora_b.safetensors", "strength": 1.0}),
       (4, "Generate", [780, 0], gen()),
       (5, "Generate", [780, 640], gen()),
       (6, "SaveImage", [1160, 0], {"filename_prefix": "FastLoRA_A"}),
       (7, "SaveImage", [1160, 640], {"filename_prefix": "FastLoRA_B"})],
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
      "T5 in NF4 (saves ~5.4 GB) and regional compile. swap_strategy = adapter (the published recipe) needs "
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
       (4, "LoraHotswap", [780, 640], {"lora_name": "lora_b.safetensors", "strength": 1.0}),
       (5, "Generate", [1140, 0], gen()),
       (6, "Generate", [1140, 640], gen()),
       (7, "SaveImage", [1520, 0], {"filename_prefix": "FastLoRA_pad_A"}),
       (8, "SaveImage", [1520, 640], {"filename_prefix": "FastLoRA_pad_B"})],
      [(1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8)])


# -- the MODEL path: ComfyUI's standard Flux graph with FastLoRA's loader in place of UNETLoader --------------
MODEL_NOTE = ("FastLoRA's loader (components = transformer only) replaces UNETLoader: its MODEL output is the "
              "same optimised, compiled transformer. Your own DualCLIPLoader / CLIPTextEncode / VAE nodes do the "
              "rest; ComfyUI's LoRA loaders work on it: their LoRA becomes FastLoRA's stack, swapped in place "
              "right before sampling (no ComfyUI weight merge, no recompile). Changing only a LoRA or its strength "
              "re-runs the LoRA node and the sampler, never the loader. ControlNet, block/attention patches and "
              "TorchCompileModel are refused before sampling with what to do instead.")


def model_loader():
    return loader(source="single files", diffusers_model="None", transformer="flux1-dev.safetensors",
                  components=COMPONENTS_TRANSFORMER)


def text_nodes(first_id, y, prompt, t5="t5xxl_fp16.safetensors", device="default"):
    """DualCLIPLoader + positive/negative CLIPTextEncode + FluxGuidance, ids first_id..first_id+3."""
    return [(first_id, "DualCLIPLoader", [40, y], {"clip_name1": "clip_l.safetensors",
                                                   "clip_name2": t5, "type": "flux",
                                                   "device": device}),
            (first_id + 1, "CLIPTextEncode", [420, y], {"text": prompt}),
            (first_id + 2, "CLIPTextEncode", [420, y + 240], {"text": ""}),
            (first_id + 3, "FluxGuidance", [860, y], {"guidance": 3.5})]


def sampler(**kw):
    d = {"seed": 42, "steps": 28, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    d.update(kw)
    return d


PROMPT = "a photo of a red fox in a snowy forest, golden hour"

build("flux_model_lora", "FastLoRA MODEL: standard Flux graph + a native LoRA loader",
      MODEL_NOTE,
      [(1, "OptimizedFluxLoader", [40, 300], model_loader()),
       *text_nodes(2, -60, PROMPT),
       (6, "LoraLoaderModelOnly", [420, 560], {"lora_name": "my_flux_lora.safetensors", "strength_model": 1.0}),
       (7, "EmptySD3LatentImage", [860, 200], {"width": 1024, "height": 1024, "batch_size": 1}),
       (8, "KSampler", [1240, 0], sampler()),
       (9, "VAELoader", [860, 400], {"vae_name": "ae.safetensors"}),
       (10, "VAEDecode", [1620, 0], {}),
       (11, "SaveImage", [1880, 0], {"filename_prefix": "FastLoRA_model"})],
      [(1, 1, 6, "model"), (2, 0, 3, "clip"), (2, 0, 4, "clip"), (3, 0, 5, "conditioning"),
       (6, 0, 8, "model"), (5, 0, 8, "positive"), (4, 0, 8, "negative"), (7, 0, 8, "latent_image"),
       (8, 0, 10, "samples"), (9, 0, 10, "vae"), (10, 0, 11, "images")])

build("flux_model_lycoris", "FastLoRA MODEL: LyCORIS / DoRA files with LoRA Hotswap for MODEL",
      "LoRA Hotswap for MODEL (FastLoRA) adds a LoRA file to the MODEL's stack, read by FastLoRA itself: LyCORIS "
      "LoKr / LoHa, DoRA and .diff files (which ComfyUI's LoRA loaders cannot hand to this MODEL) as well as plain "
      "LoRAs. It chains with ComfyUI's loaders (here after LoraLoaderModelOnly): the sampler swaps the whole stack "
      "in place. A bad file stops the graph at this node, naming it. " + MODEL_NOTE,
      [(1, "OptimizedFluxLoader", [40, 300], model_loader()),
       *text_nodes(2, -60, PROMPT),
       (6, "LoraLoaderModelOnly", [420, 560], {"lora_name": "my_flux_lora.safetensors", "strength_model": 1.0}),
       (7, "LoraHotswapModel", [420, 700], {"lora_name": "my_lokr_or_dora.safetensors", "strength": 0.8}),
       (8, "EmptySD3LatentImage", [860, 200], {"width": 1024, "height": 1024, "batch_size": 1}),
       (9, "KSampler", [1240, 0], sampler()),
       (10, "VAELoader", [860, 400], {"vae_name": "ae.safetensors"}),
       (11, "VAEDecode", [1620, 0], {}),
       (12, "SaveImage", [1880, 0], {"filename_prefix": "FastLoRA_model_lycoris"})],
      [(1, 1, 6, "model"), (6, 0, 7, "model"), (2, 0, 3, "clip"), (2, 0, 4, "clip"), (3, 0, 5, "conditioning"),
       (7, 0, 9, "model"), (5, 0, 9, "positive"), (4, 0, 9, "negative"), (8, 0, 9, "latent_image"),
       (9, 0, 11, "samples"), (10, 0, 11, "vae"), (11, 0, 12, "images")])

build("flux_model_lora_ab", "FastLoRA MODEL: A/B, one model, two LoRA loaders, two samplers",
      MODEL_NOTE + " Both samplers share the one compiled transformer; each gets its own LoRA stack.",
      [(1, "OptimizedFluxLoader", [40, 300], model_loader()),
       *text_nodes(2, -60, PROMPT),
       (6, "LoraLoaderModelOnly", [420, 560], {"lora_name": "lora_a.safetensors", "strength_model": 1.0}),
       (7, "LoraLoaderModelOnly", [420, 700], {"lora_name": "lora_b.safetensors", "strength_model": 1.0}),
       (8, "EmptySD3LatentImage", [860, 200], {"width": 1024, "height": 1024, "batch_size": 1}),
       (9, "KSampler", [1240, 0], sampler()),
       (10, "KSampler", [1240, 420], sampler()),
       (11, "VAELoader", [860, 400], {"vae_name": "ae.safetensors"}),
       (12, "VAEDecode", [1620, 0], {}),
       (13, "VAEDecode", [1620, 420], {}),
       (14, "SaveImage", [1880, 0], {"filename_prefix": "FastLoRA_model_A"}),
       (15, "SaveImage", [1880, 420], {"filename_prefix": "FastLoRA_model_B"})],
      [(1, 1, 6, "model"), (1, 1, 7, "model"), (2, 0, 3, "clip"), (2, 0, 4, "clip"), (3, 0, 5, "conditioning"),
       (6, 0, 9, "model"), (5, 0, 9, "positive"), (4, 0, 9, "negative"), (8, 0, 9, "latent_image"),
       (7, 0, 10, "model"), (5, 0, 10, "positive"), (4, 0, 10, "negative"), (8, 0, 10, "latent_image"),
       (9, 0, 12, "samples"), (11, 0, 12, "vae"), (10, 0, 13, "samples"), (11, 0, 13, "vae"),
       (12, 0, 14, "images"), (13, 0, 15, "images")])

build("flux_model_hires_fix", "FastLoRA MODEL: hires fix, a second pass on the same compiled model",
      MODEL_NOTE + " The second KSampler upscales the first pass's latent 1.5x and re-samples it at denoise 0.6 "
      "with the same MODEL: one compiled transformer, the first new size compiles once more.",
      [(1, "OptimizedFluxLoader", [40, 300], model_loader()),
       *text_nodes(2, -60, PROMPT),
       (6, "LoraLoaderModelOnly", [420, 560], {"lora_name": "my_flux_lora.safetensors", "strength_model": 1.0}),
       (7, "EmptySD3LatentImage", [860, 200], {"width": 832, "height": 832, "batch_size": 1}),
       (8, "KSampler", [1240, 0], sampler()),
       (9, "LatentUpscaleBy", [1240, 300], {"upscale_method": "bislerp", "scale_by": 1.5}),
       (10, "KSampler", [1620, 0], sampler(steps=20, denoise=0.6)),
       (11, "VAELoader", [860, 400], {"vae_name": "ae.safetensors"}),
       (12, "VAEDecode", [2000, 0], {}),
       (13, "SaveImage", [2260, 0], {"filename_prefix": "FastLoRA_model_hires"})],
      [(1, 1, 6, "model"), (2, 0, 3, "clip"), (2, 0, 4, "clip"), (3, 0, 5, "conditioning"),
       (6, 0, 8, "model"), (5, 0, 8, "positive"), (4, 0, 8, "negative"), (7, 0, 8, "latent_image"),
       (8, 0, 9, "samples"),
       (6, 0, 10, "model"), (5, 0, 10, "positive"), (4, 0, 10, "negative"), (9, 0, 10, "latent_image"),
       (10, 0, 12, "samples"), (11, 0, 12, "vae"), (12, 0, 13, "images")])

build("flux_model_16gb", "FastLoRA MODEL on a 16 GB GPU: transformer only, text encoders on the CPU",
      "For 16 GB cards (RTX 4060 Ti 16 GB / 4080 class). FastLoRA's loader holds only the fp8 transformer "
      "(components = transformer only; 13.1 GiB peak on the GPU while sampling, measured under a 15.5 GiB cap) "
      "with swap_strategy = adapter (no 24 GB bf16 master copy in system RAM; LoRAs up to max_rank 64, raise it "
      "for larger ones). DualCLIPLoader runs T5 and CLIP on the CPU (its device widget, an advanced option), so "
      "ComfyUI never has to unload the transformer to encode a prompt; an fp8 T5 file halves its RAM. "
      "With 32 GB+ of free system RAM, swap_strategy = fused samples faster but swaps take ~2 s. " + MODEL_NOTE,
      [(1, "OptimizedFluxLoader", [40, 300], loader(
          source="single files", diffusers_model="None", transformer="flux1-dev.safetensors",
          components=COMPONENTS_TRANSFORMER, quantization="fp8", swap_strategy="adapter", max_rank=64)),
       *text_nodes(2, -60, PROMPT, t5="t5xxl_fp8_e4m3fn.safetensors", device="cpu"),
       (6, "LoraLoaderModelOnly", [420, 560], {"lora_name": "my_flux_lora.safetensors", "strength_model": 1.0}),
       (7, "EmptySD3LatentImage", [860, 200], {"width": 1024, "height": 1024, "batch_size": 1}),
       (8, "KSampler", [1240, 0], sampler()),
       (9, "VAELoader", [860, 400], {"vae_name": "ae.safetensors"}),
       (10, "VAEDecode", [1620, 0], {}),
       (11, "SaveImage", [1880, 0], {"filename_prefix": "FastLoRA_model_16gb"})],
      [(1, 1, 6, "model"), (2, 0, 3, "clip"), (2, 0, 4, "clip"), (3, 0, 5, "conditioning"),
       (6, 0, 8, "model"), (5, 0, 8, "positive"), (4, 0, 8, "negative"), (7, 0, 8, "latent_image"),
       (8, 0, 10, "samples"), (9, 0, 10, "vae"), (10, 0, 11, "images")])
