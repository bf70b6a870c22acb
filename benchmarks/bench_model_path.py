"""FastLoRA's MODEL output vs ComfyUI's own model, side by side in one process on one GPU.

    python -m benchmarks.bench_model_path COMFYUI_DIR OUT.json [--paths native_bf16,native_fp8_fast,...]

Full-size Flux.1-dev with random weights (built on the GPU), rank-64 LoRAs on the 418 attention/MLP
layers (diffusers format files, as bench_flux writes them), 1024x1024, 28 steps, euler / simple, CFG 1,
conditioning built directly (T5 512 tokens, pooled CLIP). Both paths go through ComfyUI's own code:
``comfy.sd.load_lora_for_models`` (what LoraLoaderModelOnly calls) and ``comfy.sample.sample`` (what
KSampler calls, without the preview callback). Paths:

- native_bf16: ``comfy.sd.load_diffusion_model_state_dict`` of the same weights in bf16 (UNETLoader,
  weight_dtype default), ComfyUI merging the LoRA itself;
- native_fp8_fast: the same with UNETLoader's ``fp8_e4m3fn_fast`` (fp8 weights, ``fp8_optimizations``);
- native_fp8_fast_compile: that model through ComfyUI's ``TorchCompileModel`` (inductor), as its
  users pair them;
- ours, MODEL: the engine with its default options (fp8, regional compile, fused) built transformer-only,
  its MODEL from ``nodes/comfy_model.py``;
- ours, Generate's sampling loop: the engine's FluxPipeline denoising the same conditioning
  (``prompt_embeds``; no text encoders in a transformer-only engine), same compiled transformer.

Per path: seconds per image (steady), the image right after changing the LoRA file and after changing
only its strength (LoRA node + sampler, as ComfyUI re-runs them), compiles, peak GPU memory. Not an HTTP
server: ComfyUI's server needs packages the device image lacks; ComfyUI's ``nodes`` module is not
imported for the same reason (av).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACK = "fastlora_pack"
RESULT: dict[str, Any] = {}


def save(out: Path) -> None:
    out.write_text(json.dumps(RESULT, indent=2))


NATIVE_PATHS = ("native_bf16", "native_fp8_fast", "native_fp8_fast_compile")
PATHS = (*NATIVE_PATHS, "ours")


def main(comfy_dir: str, out_path: str, paths: tuple[str, ...] = PATHS) -> None:
    out = Path(out_path)
    sys.path[:0] = [comfy_dir, str(ROOT)]
    import comfy.cli_args
    import torch

    cuda = torch.cuda.is_available()
    comfy.cli_args.args.cpu = not cuda  # a CPU smoke run of this script uses the tiny ComfyUI-loadable Flux

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils

    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py")
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    loading = sys.modules[f"{PACK}.fastlora_core.loading"]
    pspecs = sys.modules[f"{PACK}.fastlora_core.specs"]
    comfy_model = sys.modules[f"{PACK}.nodes.comfy_model"]
    from benchmarks.fullsize import FLUX_DEV, target_names
    from fastlora_core.tiny import COMFY_TINY_TRANSFORMER_CONFIG

    dev = "cuda" if cuda else "cpu"
    RESULT.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    steps, size = (28, 1024) if cuda else (2, 64)
    config = FLUX_DEV if cuda else COMFY_TINY_TRANSFORMER_CONFIG
    dtype = torch.bfloat16 if cuda else torch.float32

    # -- weights, LoRA files, conditioning --------------------------------------------------------
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        transformer = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    lora_paths = {}
    for label, seed in (("A", 1), ("B", 2)):  # rank 64, |BA| ~ 5 % of |W| per layer (bench_flux.make_lora)
        gen = torch.Generator(dev).manual_seed(seed)
        sd = {}
        for n in target_names(transformer):
            lin = transformer.get_submodule(n)
            down = torch.randn(64, lin.in_features, generator=gen, device=dev) / lin.in_features**0.5
            up = torch.randn(lin.out_features, 64, generator=gen, device=dev) * (0.05 / (3 * 64) ** 0.5)
            sd[f"transformer.{n}.lora_A.weight"] = down.to(torch.bfloat16).contiguous().cpu()
            sd[f"transformer.{n}.lora_B.weight"] = up.to(torch.bfloat16).contiguous().cpu()
        lora_paths[label] = f"/tmp/bench-model-lora-{label}.safetensors"
        save_file(sd, lora_paths[label])
        del sd
    bfl = {k: v.cpu() for k, v in loading.diffusers_to_bfl(transformer.state_dict(), config["num_layers"],
                                                                 config["num_single_layers"]).items()}
    transformer.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    RESULT["setup_s"] = round(time.perf_counter() - t0, 1)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 512, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                          "guidance": 3.5}]]
    latent = torch.zeros(1, 16, size // 8, size // 8)
    loras = {k: comfy.utils.load_torch_file(p) for k, p in lora_paths.items()}
    save(out)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def sample(model: Any, seed: int = 7) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent, seed)
            comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=seed,
                                disable_pbar=True)
        sync()
        return round(time.perf_counter() - t, 3)

    def peak() -> float:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def profiled(fn: Any) -> dict[str, Any]:
        """One image under the profiler: wall time vs summed GPU kernel time (the difference is time
        the GPU waited for Python), and the CPU ops that took longest, with their call counts."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync()
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            fn()
            sync()
        wall = time.perf_counter() - t
        ev = prof.key_averages()
        kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in ev) if cuda else 0
        top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        return {"wall_s": round(wall, 3), "kernel_s": round(kernel_us / 1e6, 3),
                "top_cpu": [{"op": e.key[:80], "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1)}
                            for e in top]}

    def with_lora(model: Any, which: str, strength: float) -> Any:
        return comfy.sd.load_lora_for_models(model, None, loras[which], strength, 0)[0]

    def timed_path(name: str, base: Any, compiles: Any) -> None:
        res: dict[str, Any] = RESULT.setdefault(name, {})
        reset_peak()
        c0 = compiles()
        res["first_image_s"] = sample(with_lora(base, "A", 1.0))
        res["first_image_compiles"] = compiles() - c0
        save(out)
        m = with_lora(base, "A", 1.0)
        res["steady_s"] = [sample(m), sample(m)]
        c1 = compiles()
        t = time.perf_counter()
        res["after_lora_change_s"] = sample(with_lora(base, "B", 1.0)) + 0.0
        res["after_lora_change_queue_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        res["after_strength_change_s"] = sample(with_lora(base, "B", 0.6))
        res["after_strength_change_queue_s"] = round(time.perf_counter() - t, 3)
        res["back_to_A_s"] = sample(with_lora(base, "A", 1.0))
        res["compiles_after_first_image"] = compiles() - c1
        res["peak_gib"] = peak()
        save(out)

    # -- native: ComfyUI's own model, as UNETLoader loads it ---------------------------------------
    from torch._dynamo.utils import counters

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    for name in (p for p in NATIVE_PATHS if p in paths):
        fp8 = cuda and name != "native_bf16"  # UNETLoader weight_dtype=fp8_e4m3fn_fast
        t0 = time.perf_counter()
        native = comfy.sd.load_diffusion_model_state_dict(
            dict(bfl), {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True} if fp8 else {"dtype": dtype})
        # (a copy: ComfyUI's loader takes keys out of the dict it is given)
        RESULT[f"{name}_load_s"] = round(time.perf_counter() - t0, 1)
        if name.endswith("_compile"):  # what the TorchCompileModel node does (backend inductor)
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            native = native.clone()
            set_torch_compile_wrapper(model=native, backend="inductor")
        timed_path(name, native, graphs)
        del native
        mm.unload_all_models()
        mm.cleanup_models_gc()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    del bfl
    if "ours" not in paths:
        return
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # -- ours: the engine's MODEL ---------------------------------------------------------------
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in loading.load_shipped_config("scheduler_dev").items()
                                               if not k.startswith("_")})
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    reset_peak()
    t0 = time.perf_counter()
    options = pspecs.EngineOptions(device="cuda") if cuda else pspecs.EngineOptions(device="cpu", dtype="float32",
                                                                                     compile="off")
    engine = sys.modules[f"{PACK}.fastlora_core.engine"].FluxEngine.from_pipeline(pipe, options,
                                                                                   label="random Flux.1-dev")
    key = engine.key
    RESULT["engine_build_s"] = round(time.perf_counter() - t0, 1)
    RESULT["engine_options"] = repr(engine.options)
    model = comfy_model.model_patcher(key, engine)
    timed_path("ours_model", model, lambda: engine.compiles)
    RESULT["ours_model"]["last_swap"] = comfy_model.STATS["last"]
    steady_model = with_lora(model, "A", 1.0)
    sample(steady_model)
    RESULT["ours_model"]["profile"] = profiled(lambda: sample(steady_model))
    save(out)

    # -- ours: Generate's sampling loop on the same compiled transformer ----------------------------
    res = RESULT.setdefault("ours_generate_loop", {})
    with torch.inference_mode():  # as ComfyUI runs every node (buffers made under it stay inference tensors)
        engine.apply(pspecs.LoraStack.of((lora_paths["A"], 1.0)))
    ctx = positive[0][0].to(dev, dtype)
    pooled = positive[0][1]["pooled_output"].to(dev, dtype)

    def generate_once(seed: int = 0) -> None:
        with torch.inference_mode():
            pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
                 guidance_scale=3.5, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed))

    times = []
    c0, u0 = engine.compiles, graphs()
    for i in range(3):
        sync()
        t = time.perf_counter()
        generate_once(i)
        sync()
        times.append(round(time.perf_counter() - t, 3))
    res["s_per_image"] = times
    res["profile"] = profiled(generate_once)
    res["new_graphs"] = graphs() - u0 + (engine.compiles - c0)
    res["peak_gib_total"] = peak()
    save(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comfy_dir")
    ap.add_argument("out")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--skip-native", action="store_true", help="same as --paths ours")
    a = ap.parse_args()
    chosen = ("ours",) if a.skip_native else tuple(a.paths.split(","))
    if unknown := set(chosen) - set(PATHS):
        ap.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    main(a.comfy_dir, a.out, chosen)
