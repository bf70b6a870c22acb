"""Our engine through its public API on a full-size random Flux.1-dev pipeline (GPU).

Run through ``benchmarks/bench_flux.py --configs engine --engine-configs cold,warm``; each engine
config runs in its own process (bench_flux's worker), sharing one inductor cache folder
(``--engine-cache``) so ``warm`` measures the time to first image after a restart.

Phases (``cold``): full-size pipeline with random weights built on the GPU (T5-XXL, CLIP-L, Flux VAE,
transformer; the loader is replaced by this in-memory build, everything else is the engine's own code),
random LoRA files written to disk (rank 16/64/128, diffusers format, 418 attention/MLP/single-block
layers); baseline end-to-end image (bf16 eager pipeline + PEFT LoRA); then
``registry.get_engine(source, EngineOptions(quantization=fp8, compile=regional, swap_strategy=fused))``:
time to first image (compile included), seconds per image, swaps from disk and from the RAM cache,
a 22-swap sequence with ``engine.compiles`` and ``error_on_recompile``, peak memory.
``warm``: a new process, same cache folder: engine build + first image.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

CFG = Path(__file__).resolve().parents[1] / "fastlora_core" / "configs"
LORA_DIR = Path("/tmp/fastlora-bench-loras")


def build_pipeline():
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fastlora_core.tiny import _clip_tokenizer, _t5_tokenizer

    from .bench_flux import FLUX_DEV

    def cfg(name):
        d = json.loads((CFG / name).read_text())
        return {k: v for k, v in d.items() if not k.startswith("_")}

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    try:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel(**FLUX_DEV)
            t5 = T5EncoderModel(T5Config(**cfg("t5xxl.json")))
            clip = CLIPTextModel(CLIPTextConfig(**cfg("clip_l.json")))
            vae = AutoencoderKL(**{k: v for k, v in cfg("ae.json").items()})
    finally:
        torch.set_default_dtype(prev)
    sched = FlowMatchEulerDiscreteScheduler(**cfg("scheduler_dev.json"))
    for m in (transformer, t5, clip, vae):
        m.to(torch.bfloat16).eval().requires_grad_(False)
    return FluxPipeline(scheduler=sched, text_encoder=clip, tokenizer=_clip_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=_t5_tokenizer(), vae=vae, transformer=transformer)


def write_loras(transformer):
    import torch
    from safetensors.torch import save_file

    from .bench_flux import make_lora, target_names

    LORA_DIR.mkdir(parents=True, exist_ok=True)
    names = target_names(transformer)
    paths = {}
    for label, rank, seed in (("A64", 64, 1), ("B64", 64, 2), ("C16", 16, 3), ("D128", 128, 4), ("E64", 64, 5)):
        lo = make_lora(transformer, names, rank, seed)
        sd = {}
        for n, (down, up) in lo.items():
            sd[f"transformer.{n}.lora_A.weight"] = down.contiguous().cpu()
            sd[f"transformer.{n}.lora_B.weight"] = up.contiguous().cpu()
        p = LORA_DIR / f"{label}.safetensors"
        save_file(sd, str(p))
        paths[label] = str(p)
        del lo, sd
    torch.cuda.empty_cache()
    return paths


def run(args, RESULT, save):
    import torch
    import torch._dynamo

    import fastlora_core.loading as loading
    from fastlora_core import registry
    from fastlora_core.engine import run_pipeline
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraSpec, LoraStack, ModelSource

    which = [c for c in (args.engine_configs or "cold").split(",") if c]
    mode = which[0]
    res = RESULT.setdefault("engine", {})
    res["mode"] = mode
    cache = os.environ.get("FASTLORA_BENCH_CACHE", "/tmp/fastlora-bench-cache")
    opts = EngineOptions(quantization="fp8", compile="regional", swap_strategy="fused", compile_cache_dir=cache)
    res["options"] = repr(opts)
    t0 = time.perf_counter()
    pipe = build_pipeline()
    torch.cuda.synchronize()
    res["build_random_pipeline_s"] = round(time.perf_counter() - t0, 1)
    save()
    req = GenerateRequest(prompt="a photo of a cat on a red sofa", seed=0, steps=args.steps, width=1024, height=1024)
    if mode == "cold":
        t0 = time.perf_counter()
        paths = write_loras(pipe.transformer)
        res["write_loras_s"] = round(time.perf_counter() - t0, 1)
        res["lora_file_mb"] = {k: round(os.path.getsize(v) / 2**20, 1) for k, v in paths.items()}
        (LORA_DIR / "paths.json").write_text(json.dumps(paths))
        # baseline end to end: bf16 eager pipeline + PEFT LoRA (unfused)
        pipe.load_lora_weights(paths["A64"], adapter_name="a")
        run_pipeline(pipe, GenerateRequest(prompt="warm", steps=2, width=1024, height=1024))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_pipeline(pipe, req)
        torch.cuda.synchronize()
        res["baseline_e2e_bf16_eager_peft_s"] = round(time.perf_counter() - t0, 3)
        pipe.unload_lora_weights()
        save()
    else:
        paths = json.loads((LORA_DIR / "paths.json").read_text())

    loading.load_pipeline = lambda source, dtype: pipe  # the engine's loader, replaced by the random build
    source = ModelSource(diffusers_dir="/tmp/random-flux-dev")
    torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    engine = registry.get_engine(source, opts)
    torch.cuda.synchronize()
    res["engine_build_s"] = round(time.perf_counter() - t_load, 1)
    stackA = LoraStack.of((paths["A64"], 1.0))
    t0 = time.perf_counter()
    r = engine.generate(req, stackA)
    res["first_image_s_after_engine_build"] = round(time.perf_counter() - t0, 1)
    res["first_image_s_incl_engine_build"] = round(time.perf_counter() - t_load, 1)
    res["first_image_new_compiles"] = r.new_compiles
    res["first_swap"] = r.swap.as_dict() if r.swap else None
    try:
        from torch._dynamo.utils import compile_times, counters

        res["compile_times"] = compile_times(repr="str")[:4000]
        res["cache_counters"] = {k: dict(counters[k]) for k in ("inductor", "aot_autograd") if k in counters}
    except Exception as exc:  # noqa: BLE001
        res["compile_times"] = f"unavailable: {exc}"
    save()
    e2e = []
    for _ in range(2):
        r = engine.generate(req, stackA)
        e2e.append(round(r.seconds, 3))
    res["e2e_s_per_image"] = e2e
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["engine_memory_gib"] = round(engine.memory_bytes() / 2**30, 2)
    save()
    if mode != "cold":
        return
    # transformer-only loop through the engine's compiled transformer (same inputs as bench_flux)
    from .bench_flux import Inputs, run_loop, time_loops

    with torch.inference_mode():
        inp = Inputs(steps=args.steps)
        res["engine_transformer_loop"] = time_loops(lambda: run_loop(engine.transformer, inp), args.loops)
    save()
    # swaps: from disk (cache cleared) and from the RAM cache
    sw = {}
    for label in ("B64", "C16", "D128", "A64"):
        engine.lora_cache.clear()
        rep = engine.apply(LoraStack.of((paths[label], 1.0)))
        sw[f"{label}_from_disk_ms"] = round(rep.swap_ms, 1)
    for label in ("B64", "C16", "D128", "A64", "B64"):
        rep = engine.apply(LoraStack.of((paths[label], 1.0)))
        sw[f"{label}_from_ram_ms"] = round(rep.swap_ms, 1)
    ram64 = []
    for label in ("B64", "A64", "B64", "A64"):
        ram64.append(round(engine.apply(LoraStack.of((paths[label], 1.0))).swap_ms, 1))
    sw["r64_from_ram_ms_median"] = statistics.median(ram64)
    res["swaps"] = sw
    save()
    # 22-swap sequence with generation (1 step) under error_on_recompile
    seq_plan = [((("A64", 1.0),)), (("B64", 1.0),), (("A64", 0.5),), (("C16", 1.0),), (("A64", 1.0), ("C16", 0.7)),
                (), (("D128", 0.8),), (("E64", 1.0), ("B64", 0.5)), (("C16", 0.3),), (("A64", 1.0),), (("D128", 1.0),)]
    seq_plan = seq_plan * 2
    small = GenerateRequest(prompt="seq", seed=1, steps=1, width=1024, height=1024)
    before = engine.compiles
    torch._dynamo.config.error_on_recompile = True
    times = []
    err = None
    try:
        for st in seq_plan:
            stack = LoraStack(tuple(LoraSpec(paths[k], s) for k, s in st))
            rr = engine.generate(small, stack)
            times.append(round(rr.swap.swap_ms, 1) if rr.swap else 0.0)
    except Exception as exc:  # noqa: BLE001
        err = f"{type(exc).__name__}: {exc}"[:500]
    torch._dynamo.config.error_on_recompile = False
    res["swap_sequence"] = {"swaps": len(seq_plan), "swap_ms": times, "new_compiles": engine.compiles - before,
                            "error": err}
    res["peak_gib_after_swaps"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save()
    _ = math
