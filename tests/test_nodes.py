"""The ComfyUI nodes without ComfyUI: schemas, handle flow, ComfyUI's execution order with cached
outputs, cancellation and ComfyUI-driven unloading (tests/comfy_stub.py stands in for ComfyUI)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import comfy_stub  # tests/ helper (pytest puts tests/ on sys.path)
import pytest
import torch

STEPS = 2
SIZE = 64
LORAS = ("fastlora-tiny-style", "fastlora-tiny-character", "fastlora-tiny-wide", "fastlora-tiny-single")
LOADER = {
    "source": "diffusers folder", "diffusers_model": "fastlora-tiny-flux", "transformer": "None",
    "clip_l": "None", "t5xxl": "None", "vae": "None", "quantization": "none", "t5_quantization": "none",
    "attention": "auto", "compile": "off", "offload": "none", "dtype": "float32", "swap_strategy": "fused",
    "max_rank": 128,
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlora_core.tiny import write_comfy_tree

    root = tmp_path_factory.mktemp("comfy") / "models"
    write_comfy_tree(root)
    for folder, name in (("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                         ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def comfy(models_dir: Path) -> Any:
    fake = comfy_stub.install(models_dir)
    yield fake
    from fastlora_core import registry

    registry.release_all()
    comfy_stub.uninstall()


@pytest.fixture(scope="module")
def pack(comfy: Any) -> Any:
    return comfy_stub.load_pack()


@pytest.fixture(autouse=True)
def _fresh_interrupt(comfy: Any) -> None:
    comfy.model_management.interrupt_processing = False


def run(pack: Any, class_type: str, **inputs: Any) -> tuple[Any, ...]:
    """Execute one node the way ComfyUI does: a fresh instance, FUNCTION called under inference_mode."""
    cls = pack.NODE_CLASS_MAPPINGS[class_type]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def gen_inputs(**over: Any) -> dict[str, Any]:
    base = {"prompt": "a tiny cat", "seed": 7, "steps": STEPS, "guidance": 3.5, "width": SIZE, "height": SIZE,
            "batch": 1}
    base.update(over)
    return base


def lora_path(models_dir: Path, name: str) -> str:
    return str((models_dir / "loras" / f"{name}.safetensors").resolve())


def reference(handle: Any, stack: Any, **over: Any) -> torch.Tensor:
    """What the core gives for this stack, called directly (no node in between)."""
    from fastlora_core import registry, specs

    engine = registry.get_engine(handle.key.source, handle.key.options)
    g = gen_inputs(**over)
    request = specs.GenerateRequest(prompt=g["prompt"], seed=g["seed"], steps=g["steps"], guidance=g["guidance"],
                                    width=g["width"], height=g["height"], batch=g["batch"])
    with torch.inference_mode():
        return engine.generate(request, stack).images


# -- registration and schemas -----------------------------------------------------------------------
def test_registration_and_node_contract(pack: Any) -> None:
    assert set(pack.NODE_CLASS_MAPPINGS) == {"OptimizedFluxLoader", "LoraHotswap", "LoraHotswapModel", "PadDummyLora",
                                                "Generate"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "FastLoRA/Flux", name
        assert len(cls.DESCRIPTION) > 40, name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        for section in cls.INPUT_TYPES().values():
            for input_name, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert pack.NODE_CLASS_MAPPINGS["Generate"].RETURN_TYPES == ("IMAGE",)


def test_input_schemas_list_the_right_files(pack: Any) -> None:
    schema = pack.NODE_CLASS_MAPPINGS["OptimizedFluxLoader"].INPUT_TYPES()
    loader = {**schema["required"], **schema["optional"]}
    assert loader["diffusers_model"][0] == ["None", "fastlora-tiny-flux"]
    assert loader["transformer"][0] == ["None", "fastlora-tiny-flux.safetensors", "flux1-dev.safetensors"]
    assert loader["clip_l"][0] == loader["t5xxl"][0] == [
        "None", "clip_l.safetensors", "fastlora-tiny-clip_l.safetensors", "fastlora-tiny-t5xxl.safetensors",
        "t5xxl_fp16.safetensors"]
    assert loader["vae"][0] == ["None", "ae.safetensors", "fastlora-tiny-ae.safetensors"]
    assert loader["compile"][0] == ["off", "full", "regional"]
    assert loader["swap_strategy"][1]["default"] == "fused"
    files = sorted(f"{n}.safetensors" for n in LORAS)
    assert pack.NODE_CLASS_MAPPINGS["LoraHotswap"].INPUT_TYPES()["required"]["lora_name"][0] == files
    pad = pack.NODE_CLASS_MAPPINGS["PadDummyLora"].INPUT_TYPES()["required"]
    assert pad["lora_1"][0] == ["None", *files]
    assert pad["target"][0] == ["listed LoRAs", "all Flux layers"]
    seed = pack.NODE_CLASS_MAPPINGS["Generate"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is True


def test_loader_refuses_incomplete_sources(pack: Any) -> None:
    from fastlora_core.errors import OptionsError

    with pytest.raises(OptionsError, match="diffusers_model"):
        run(pack, "OptimizedFluxLoader", **{**LOADER, "diffusers_model": "None"})
    with pytest.raises(OptionsError, match="clip_l, t5xxl, vae"):
        run(pack, "OptimizedFluxLoader", **{**LOADER, "source": "single files", "transformer": "flux1-dev.safetensors"})


# The loader's inputs in the order every earlier version showed them: UI-format workflows store widget
# values by position, so workflows saved before the advanced group existed must still map.
HISTORIC_LOADER_ORDER = ["source", "diffusers_model", "transformer", "clip_l", "t5xxl", "vae", "quantization",
                         "t5_quantization", "attention", "compile", "offload", "dtype", "swap_strategy", "max_rank"]
RARELY_TOUCHED = {"t5_quantization", "attention", "compile", "offload", "dtype", "swap_strategy", "max_rank",
                  "deterministic"}


def test_loader_keeps_widget_order_and_folds_rare_options_into_an_advanced_group(pack: Any) -> None:
    schema = pack.NODE_CLASS_MAPPINGS["OptimizedFluxLoader"].INPUT_TYPES()
    ordered = [*schema["required"], *schema.get("optional", {})]  # ComfyUI's front end: required, then optional
    assert ordered == HISTORIC_LOADER_ORDER + ["components", "deterministic"]  # new inputs only ever go at the end
    specs = {**schema["required"], **schema["optional"]}
    advanced = {name for name, spec in specs.items() if spec[1].get("advanced")}
    assert advanced == RARELY_TOUCHED
    assert list(schema["required"]) == ["source"], "only source may be required: the rest have defaults"


def test_loader_defaults_are_the_same_in_the_schema_and_the_function(pack: Any) -> None:
    """ComfyUI leaves an optional input out of the call when an (API) graph omits it, so the Python
    default is what runs: it must be the default the widget shows."""
    import inspect

    cls = pack.NODE_CLASS_MAPPINGS["OptimizedFluxLoader"]
    schema = cls.INPUT_TYPES()["optional"]
    params = inspect.signature(cls.load).parameters
    for name, (_kind, opts) in schema.items():
        assert params[name].default == opts["default"], name


def validate(pack: Any, graph_inputs: dict[str, Any]) -> bool | str:
    """What ComfyUI's execution.validate_inputs does with the loader's inputs: the inputs named in
    VALIDATE_INPUTS' signature skip ComfyUI's own list check and go to VALIDATE_INPUTS; every other
    combo value must be in its list."""
    import inspect

    cls = pack.NODE_CLASS_MAPPINGS["OptimizedFluxLoader"]
    schema = cls.INPUT_TYPES()
    specs = {**schema["required"], **schema["optional"]}
    delegated = inspect.getfullargspec(cls.VALIDATE_INPUTS).args
    for name, value in graph_inputs.items():
        if name not in delegated and isinstance(specs[name][0], list) and value not in specs[name][0]:
            return f"{name}: {value!r} not in list"
    return cls.VALIDATE_INPUTS(**{k: v for k, v in graph_inputs.items() if k in delegated})


def test_inputs_the_source_does_not_read_never_block_validation(pack: Any) -> None:
    diffusers = {**LOADER, "transformer": "flux1-dev-fp8.safetensors", "clip_l": "clip_l_missing.safetensors",
                 "t5xxl": "t5xxl_fp8_e4m3fn.safetensors", "vae": "missing_vae.safetensors"}
    assert validate(pack, diffusers) is True
    files = {**LOADER, "source": "single files", "diffusers_model": "FLUX.1-dev",
             "transformer": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors",
             "t5xxl": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
    assert validate(pack, files) is True
    only_what_is_read = {"source": "diffusers folder", "diffusers_model": "fastlora-tiny-flux"}
    assert validate(pack, only_what_is_read) is True


def test_inputs_the_source_reads_are_still_checked_with_a_clear_message(pack: Any) -> None:
    missing = validate(pack, {**LOADER, "diffusers_model": "FLUX.1-dev"})
    assert isinstance(missing, str) and "'FLUX.1-dev' is not in models/diffusers" in missing
    files = {**LOADER, "source": "single files", "transformer": "flux1-dev.safetensors",
             "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp8_e4m3fn.safetensors", "vae": "ae.safetensors"}
    wrong = validate(pack, files)
    assert isinstance(wrong, str) and "t5xxl = 't5xxl_fp8_e4m3fn.safetensors' is not in models/text_encoders" in wrong
    unset = validate(pack, {**files, "clip_l": "None", "vae": "None"})
    assert isinstance(unset, str) and "needs clip_l, vae" in unset
    assert validate(pack, {**LOADER, "source": "safetensors"}) == (
        "source 'safetensors' is not one of diffusers folder, single files.")
    assert validate(pack, {**LOADER, "quantization": "fp4"}) == "quantization: 'fp4' not in list"
    linked = validate(pack, {**files, "t5xxl": None})  # a link: checked when the loader runs
    assert linked is True
    assert validate(pack, {**files, "source": None}) is True


# -- the handle flow ----------------------------------------------------------------------------
def test_handle_flow_is_declarative(pack: Any, models_dir: Path) -> None:
    from fastlora_core import registry, specs

    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    again, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    assert base == again and registry.peek(base.key) is registry.peek(again.key)
    assert base.key.options.device == "cpu"  # ComfyUI's device, not "auto"
    engine = registry.peek(base.key)
    stack_before = engine.loaded_stack

    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-style.safetensors", strength=0.8)
    (ab,) = run(pack, "LoraHotswap", engine=a, lora_name="fastlora-tiny-character.safetensors", strength=-0.5)
    assert base.stack == specs.LoraStack()  # inputs are never mutated
    assert a.stack == specs.LoraStack.of((lora_path(models_dir, "fastlora-tiny-style"), 0.8))
    assert [e.strength for e in ab.stack.entries] == [0.8, -0.5]
    assert engine.loaded_stack == stack_before  # LoraHotswap never touches the engine

    (padded,) = run(pack, "PadDummyLora", engine=a, target="listed LoRAs", lora_1="fastlora-tiny-wide.safetensors",
                    lora_2="None", lora_3="fastlora-tiny-style.safetensors", lora_4="None", max_rank=0)
    assert padded.stack == a.stack and padded.slot is not None
    assert [Path(p).stem for p in padded.slot.lora_paths] == ["fastlora-tiny-wide", "fastlora-tiny-style"]
    (wider,) = run(pack, "PadDummyLora", engine=padded, target="all Flux layers", lora_1="None", lora_2="None",
                   lora_3="None", lora_4="None", max_rank=32)
    assert wider.slot.all_layers and wider.slot.max_rank == 32 and len(wider.slot.lora_paths) == 2
    from fastlora_core.errors import OptionsError

    with pytest.raises(OptionsError):
        run(pack, "PadDummyLora", engine=base, target="listed LoRAs", lora_1="None", lora_2="None", lora_3="None",
            lora_4="None", max_rank=0)


def test_transformer_only_loads_no_text_encoder_or_vae_and_generate_says_why(pack: Any) -> None:
    from fastlora_core import registry
    from fastlora_core.errors import OptionsError

    flux_nodes = sys.modules[f"{comfy_stub.PACK_NAME}.nodes.flux_nodes"]
    full, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    full_bytes = registry.peek(full.key).memory_bytes()
    alone, _model = run(pack, "OptimizedFluxLoader", **LOADER, components=flux_nodes.COMPONENTS_TRANSFORMER)
    engine = registry.peek(alone.key)
    assert alone.key.source.transformer_only and alone.key != full.key
    assert (engine.pipe.text_encoder, engine.pipe.text_encoder_2, engine.pipe.vae) == (None, None, None)
    assert engine.memory_bytes() == sum(p.numel() * p.element_size() for p in engine.transformer.parameters()) \
        + sum(b.numel() * b.element_size() for b in engine.transformer.buffers())
    assert engine.memory_bytes() < full_bytes
    with pytest.raises(OptionsError, match="transformer only"):
        run(pack, "Generate", engine=alone, **gen_inputs())
    with pytest.raises(OptionsError, match="needs transformer"):
        run(pack, "OptimizedFluxLoader", **{**LOADER, "source": "single files"},
            components=flux_nodes.COMPONENTS_TRANSFORMER)


def test_two_branches_with_cached_upstream_get_their_own_lora(pack: Any, models_dir: Path, comfy: Any) -> None:
    """Graph (b): loader -> {LoraHotswap A -> Generate, LoraHotswap B -> Generate}. ComfyUI runs the
    loader once and hands the same cached handle to both branches; on the next queue only what
    changed re-runs, so Generate(A) may run right after Generate(B) with A's cached handle."""
    from fastlora_core import specs

    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-style.safetensors", strength=1.0)
    (b,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-character.safetensors", strength=1.0)
    (img_a,) = run(pack, "Generate", engine=a, **gen_inputs())
    (img_b,) = run(pack, "Generate", engine=b, **gen_inputs())
    (img_a2,) = run(pack, "Generate", engine=a, **gen_inputs())  # cached upstream, other branch ran last
    (img_base,) = run(pack, "Generate", engine=base, **gen_inputs())  # no LoRA: base weights restored

    assert img_a.shape == (1, SIZE, SIZE, 3) and img_a.dtype == torch.float32
    assert 0.0 <= float(img_a.min()) and float(img_a.max()) <= 1.0
    assert torch.equal(img_a, img_a2)
    assert not torch.equal(img_a, img_b) and not torch.equal(img_a, img_base)
    ref_b = reference(base, specs.LoraStack.of(lora_path(models_dir, "fastlora-tiny-character")))
    ref_a = reference(base, specs.LoraStack.of(lora_path(models_dir, "fastlora-tiny-style")))
    ref_base = reference(base, specs.LoraStack())
    assert torch.equal(img_b, ref_b) and torch.equal(img_a, ref_a) and torch.equal(img_base, ref_base)
    assert comfy.utils.progress_log[-STEPS:] == [(1, STEPS), (2, STEPS)]


def test_stack_of_two_loras_with_strengths(pack: Any, models_dir: Path) -> None:
    from fastlora_core import specs

    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (one,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-style.safetensors", strength=0.7)
    (two,) = run(pack, "LoraHotswap", engine=one, lora_name="fastlora-tiny-wide.safetensors", strength=0.4)
    (img,) = run(pack, "Generate", engine=two, **gen_inputs(batch=2))
    assert img.shape == (2, SIZE, SIZE, 3)
    stack = specs.LoraStack.of((lora_path(models_dir, "fastlora-tiny-style"), 0.7),
                               (lora_path(models_dir, "fastlora-tiny-wide"), 0.4))
    assert torch.equal(img, reference(base, stack, batch=2))
    # GET /fastlora/stats tells an operator where the LoRA change's time went
    flux_nodes = sys.modules[pack.__name__ + ".nodes.flux_nodes"]
    (live,) = flux_nodes.stats()["engines"]
    swap = live["last_swap"]
    assert swap["stack"] == stack.describe() and swap["changed"] and swap["layers_written"] > 0
    assert swap["read_ms"] + swap["stage_ms"] <= swap["swap_ms"]
    assert {"read", "build", "first_lora", "first_image"} <= set(live["timings"])


# -- cancel and memory ----------------------------------------------------------------------------
def test_cancel_stops_within_a_step_and_next_run_works(pack: Any, models_dir: Path, comfy: Any) -> None:
    from fastlora_core import specs

    mm = comfy.model_management
    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-single.safetensors", strength=1.0)
    steps_seen: list[tuple[int, int]] = []
    real_hook = comfy.utils.PROGRESS_BAR_HOOK

    def press_cancel_at_step_1(value: int, total: int, preview: Any) -> None:
        steps_seen.append((value, total))
        if value == 1:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 1
        real_hook(value, total, preview)

    comfy.utils.set_progress_bar_global_hook(press_cancel_at_step_1)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(pack, "Generate", engine=a, **gen_inputs(steps=4))
    finally:
        comfy.utils.set_progress_bar_global_hook(real_hook)
    assert steps_seen == [(1, 4)]  # stopped right after the step in which Cancel was pressed
    (img,) = run(pack, "Generate", engine=a, **gen_inputs())
    assert torch.equal(img, reference(base, specs.LoraStack.of(lora_path(models_dir, "fastlora-tiny-single"))))


def test_cancel_acts_between_transformer_blocks_within_a_step(pack: Any, models_dir: Path, comfy: Any) -> None:
    """Cancel pressed while the first (double) block of step 1 runs: the next block never starts
    (before, the whole step ran first: minutes per step for Flux on a CPU)."""
    from fastlora_core import registry, specs

    mm = comfy.model_management
    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-style.safetensors", strength=1.0)
    transformer = registry.peek(base.key).transformer
    blocks: list[str] = []

    def press_cancel(module: Any, args: Any, output: Any) -> None:
        blocks.append("double")
        mm.interrupt_current_processing(True)

    hooks = [transformer.transformer_blocks[0].register_forward_hook(press_cancel),
             transformer.single_transformer_blocks[0].register_forward_hook(lambda *_: blocks.append("single"))]
    logged = len(comfy.utils.progress_log)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(pack, "Generate", engine=a, **gen_inputs(steps=4))
    finally:
        for hook in hooks:
            hook.remove()
    assert blocks == ["double"], blocks
    assert comfy.utils.progress_log[logged:] == []  # step 1 never finished
    assert mm.interrupt_processing is False  # consumed, as ComfyUI expects
    (img,) = run(pack, "Generate", engine=a, **gen_inputs())
    assert torch.equal(img, reference(base, specs.LoraStack.of(lora_path(models_dir, "fastlora-tiny-style"))))


def test_swap_log_on_a_cpu_has_no_gpu_transfer(pack: Any, caplog: pytest.LogCaptureFixture) -> None:
    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-wide.safetensors", strength=0.3)
    with caplog.at_level(logging.INFO):
        run(pack, "Generate", engine=a, **gen_inputs())
    (line,) = [r.getMessage() for r in caplog.records if "applied in" in r.getMessage()]
    assert "fastlora-tiny-wide.safetensors" in line and "read " in line and "GPU" not in line, line


def test_previews_send_one_progress_event_per_step(pack: Any, comfy: Any) -> None:
    args = comfy.cli_args.args
    events: list[tuple[int, int, Any]] = []
    real_hook = comfy.utils.PROGRESS_BAR_HOOK

    def record(value: int, total: int, preview: Any) -> None:
        events.append((value, total, preview))
        real_hook(value, total, preview)

    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    comfy.utils.set_progress_bar_global_hook(record)
    args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
    try:
        run(pack, "Generate", engine=base, **gen_inputs(steps=3))
    finally:
        args.preview_method = comfy.cli_args.LatentPreviewMethod.NoPreviews
        comfy.utils.set_progress_bar_global_hook(real_hook)
    assert [(v, t) for v, t, _ in events] == [(1, 3), (2, 3), (3, 3)]
    for _v, _t, preview in events:
        kind, image, size = preview
        assert kind == "JPEG" and image.mode == "RGB" and size == 512


def test_comfy_unload_frees_the_engine_and_next_run_rebuilds(pack: Any, models_dir: Path, comfy: Any) -> None:
    """``POST /free {"unload_models": true}`` and OOM recovery call unload_all_models()."""
    from fastlora_core import registry

    mm = comfy.model_management
    nodes = sys.modules[f"{comfy_stub.PACK_NAME}.nodes.flux_nodes"]
    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    (a,) = run(pack, "LoraHotswap", engine=base, lora_name="fastlora-tiny-style.safetensors", strength=1.0)
    (before,) = run(pack, "Generate", engine=a, **gen_inputs(seed=3))
    engine = registry.peek(base.key)
    assert [lm.model.engine for lm in mm.current_loaded_models] == [engine]
    assert mm.current_loaded_models[0].model.model_size() > 0

    mm.unload_all_models()
    assert engine.released and registry.peek(base.key) is None
    assert mm.current_loaded_models == []

    builds = nodes.STATS["builds"]
    (after,) = run(pack, "Generate", engine=a, **gen_inputs(seed=3))  # cached handle, engine rebuilt
    assert nodes.STATS["builds"] == builds + 1
    assert torch.equal(before, after)
    assert len(mm.current_loaded_models) == 1 and mm.current_loaded_models[0].model.engine is registry.peek(base.key)


def test_partial_unload_path_and_new_options_replace_engine(pack: Any, comfy: Any) -> None:
    from fastlora_core import registry

    mm = comfy.model_management
    base, _model = run(pack, "OptimizedFluxLoader", **LOADER)
    run(pack, "Generate", engine=base, **gen_inputs())
    wrapper = mm.current_loaded_models[0].model
    # free_memory asking for less than the engine holds takes the partially_unload path
    assert mm.free_memory(1, mm.get_torch_device()) == []  # stays listed ...
    assert wrapper.engine.released and wrapper.loaded_size() == 0  # ... but holds nothing
    (img,) = run(pack, "Generate", engine=base, **gen_inputs())
    assert [lm.model.engine for lm in mm.current_loaded_models] == [registry.peek(base.key)]

    other, _model = run(pack, "OptimizedFluxLoader", **{**LOADER, "attention": "sdpa"})
    old = registry.peek(base.key)
    assert old is None  # the registry released the previous engine
    assert [lm.model.engine for lm in mm.current_loaded_models] == [registry.peek(other.key)]


class FakeGpuEngine:
    """What the ComfyUI wrapper sees of an engine on an accelerator: 1000 bytes of weights and
    ``masters`` bytes of fused masters beside them on the GPU."""

    released = False
    offloaded = False
    device = torch.device("cuda")
    dtype = torch.bfloat16

    def __init__(self, masters: int = 0) -> None:
        self.masters = masters

    def memory_bytes(self) -> int:
        return 0 if self.offloaded else 1000 + self.masters

    def masters_to_ram(self) -> int:
        freed, self.masters = self.masters, 0
        return freed

    def offload(self) -> None:
        self.offloaded = True

    def reload(self) -> None:
        self.offloaded = False


def test_gpu_style_unload_offloads_instead_of_releasing(pack: Any) -> None:
    """On an accelerator the wrapper moves weights to CPU (keeping compiled graphs) via offload()."""
    memory = sys.modules[f"{comfy_stub.PACK_NAME}.nodes.memory"]
    engine = FakeGpuEngine()
    w = memory.EngineModel(engine, torch.device("cuda"), torch.device("cpu"))
    assert w.loaded_size() == 1000 and w.current_loaded_device() == torch.device("cuda")
    w.detach()
    assert engine.offloaded and w.loaded_size() == 0 and w.current_loaded_device() == torch.device("cpu")
    assert w.partially_load(torch.device("cuda"), 1e32) == 1000 and not engine.offloaded


@pytest.mark.parametrize(("memory_to_free", "kept"), [(500, True), (600, True), (601, False)])
def test_a_partial_unload_moves_the_gpu_masters_to_ram_and_keeps_the_engine(
        pack: Any, memory_to_free: int, kept: bool) -> None:
    """Decision 65: ComfyUI's ``free_memory`` asks a model for some bytes before it loads a text
    encoder or decodes. An engine with its masters on the GPU (a 48 GB card on the MODEL path,
    decision 64) gives them back by moving the masters to RAM and stays loaded (slower swaps, no
    rebuild); only when that is not enough is it unloaded whole, as before."""
    memory = sys.modules[f"{comfy_stub.PACK_NAME}.nodes.memory"]
    engine = FakeGpuEngine(masters=600)
    w = memory.EngineModel(engine, torch.device("cuda"), torch.device("cpu"))
    assert w.loaded_size() == 1600
    freed = w.partially_unload(torch.device("cpu"), memory_to_free)
    assert engine.masters == 0  # the masters go first, in every case
    if kept:
        assert freed == 600 and not engine.offloaded and w.loaded_size() == 1000
    else:
        assert freed == 1600 and engine.offloaded and w.loaded_size() == 0


def test_the_loader_lets_the_engine_ask_comfyui_to_make_room(pack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 66: the engine it builds can ask ComfyUI's memory manager to unload its other models (a
    text encoder encoded before the loader ran) on the device the loader builds on."""
    from fastlora_core import registry

    bridge = sys.modules[pack.__name__ + ".nodes.comfy_bridge"]
    registry.release_all()  # a build, not an engine of an earlier test
    seen: dict[str, Any] = {}
    real = registry.get_engine

    def spy(source: Any, options: Any = None, make_room: Any = None) -> Any:
        seen["make_room"] = make_room
        return real(source, options, make_room=make_room)

    monkeypatch.setattr(registry, "get_engine", spy)
    asked: list[tuple[float, Any]] = []
    monkeypatch.setattr(bridge, "free_memory", lambda needed, device: asked.append((needed, device)))
    run(pack, "OptimizedFluxLoader", **LOADER)
    seen["make_room"](40 * 2**30)
    assert asked[-1] == (40 * 2**30, bridge.torch_device())


# -- adapter strategy with compile ---------------------------------------------------------------------
@pytest.mark.slow
def test_pad_dummy_lora_adapter_compiled_swaps_without_recompiling(pack: Any, models_dir: Path) -> None:
    from fastlora_core import registry

    base, _model = run(pack, "OptimizedFluxLoader", **{**LOADER, "swap_strategy": "adapter", "compile": "regional",
                                                  "max_rank": 16})
    (padded,) = run(pack, "PadDummyLora", engine=base, target="listed LoRAs",
                    lora_1="fastlora-tiny-style.safetensors", lora_2="fastlora-tiny-character.safetensors",
                    lora_3="fastlora-tiny-wide.safetensors", lora_4="None", max_rank=0)
    handles = {}
    for name in ("fastlora-tiny-style", "fastlora-tiny-character", "fastlora-tiny-wide"):
        (handles[name],) = run(pack, "LoraHotswap", engine=padded, lora_name=f"{name}.safetensors", strength=1.0)
    (first,) = run(pack, "Generate", engine=handles["fastlora-tiny-style"], **gen_inputs())
    engine = registry.peek(base.key)
    compiles = engine.compiles
    images = {n: run(pack, "Generate", engine=h, **gen_inputs())[0] for n, h in handles.items()}
    (again,) = run(pack, "Generate", engine=handles["fastlora-tiny-style"], **gen_inputs())
    assert engine.compiles == compiles, "a LoRA swap recompiled"
    assert torch.equal(first, again) and torch.equal(first, images["fastlora-tiny-style"])
    assert not torch.equal(images["fastlora-tiny-style"], images["fastlora-tiny-wide"])


@pytest.mark.slow
def test_cancel_between_blocks_keeps_the_regional_compile(pack: Any) -> None:
    """The block check runs outside the compiled blocks: a cancel mid-step and the runs after it
    compile nothing new and give the same image."""
    from fastlora_core import registry, specs

    base, _model = run(pack, "OptimizedFluxLoader", **{**LOADER, "compile": "regional"})
    (first,) = run(pack, "Generate", engine=base, **gen_inputs())
    engine = registry.peek(base.key)
    compiles = engine.compiles
    # the blocks run compiled: compiled now, or loaded as saved by an earlier engine (decision 40)
    assert compiles > 0 or (engine.precompiled is not None and engine.precompiled.stats.loaded > 0)
    flux_nodes = sys.modules[pack.__name__ + ".nodes.flux_nodes"]
    (live,) = flux_nodes.stats()["engines"]  # GET /fastlora/stats says which
    blocks = live["saved_blocks"]
    assert blocks["compiled"] + blocks["loaded"] == 2 and blocks["compiling_in_background"] == 0

    class Stop(Exception):
        pass

    calls = [0]

    def stop_at_the_second_block() -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise Stop

    g = gen_inputs()
    request = specs.GenerateRequest(prompt=g["prompt"], seed=g["seed"], steps=g["steps"], guidance=g["guidance"],
                                    width=g["width"], height=g["height"])
    with pytest.raises(Stop), torch.inference_mode():
        engine.generate(request, base.stack, check_cancel=stop_at_the_second_block)
    (again,) = run(pack, "Generate", engine=base, **gen_inputs())
    assert calls[0] == 2 and engine.compiles == compiles, "the cancel check recompiled"
    assert torch.equal(first, again)


# -- import without ComfyUI ---------------------------------------------------------------------------
def _import_pack_in_subprocess(prelude: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO)
        {prelude}
        spec = importlib.util.spec_from_file_location("pack_under_test", {str(comfy_stub.ROOT / '__init__.py')!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pack_under_test"] = mod
        spec.loader.exec_module(mod)
        print("NODES", sorted(mod.NODE_CLASS_MAPPINGS))
        print("COMFY_IMPORTED", any(m == "comfy" or m.startswith("comfy.") or m == "folder_paths" for m in sys.modules))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(comfy_stub.ROOT.parent))


def test_pack_imports_without_comfyui() -> None:
    out = _import_pack_in_subprocess("")
    assert out.returncode == 0, out.stderr
    assert "NODES ['Generate', 'LoraHotswap', 'LoraHotswapModel', 'OptimizedFluxLoader', 'PadDummyLora']" in out.stdout
    assert "COMFY_IMPORTED False" in out.stdout


def test_missing_dependency_is_logged_not_raised() -> None:
    out = _import_pack_in_subprocess("sys.modules['torch'] = None  # simulate a missing dependency")
    assert out.returncode == 0, out.stderr
    assert "NODES []" in out.stdout
    assert "requirements.txt" in out.stderr and "nodes disabled" in out.stderr
    logging.getLogger(__name__).debug(out.stderr)
