"""Our engine through its public API on a full-size random Flux.1-dev pipeline (GPU).

Run through ``benchmarks/bench_flux.py --configs engine --engine-configs cold,warm``; each engine
config runs in its own process (bench_flux's worker), sharing one inductor cache folder
(``--engine-cache``) so ``warm`` measures the time to first image after a restart.

Phases (``cold``): full-size pipeline with random weights built on the GPU (T5-XXL, CLIP-L, Flux VAE,
transformer; the loader is replaced by this in-memory build, everything else is the engine's own code),
random LoRA files written to disk (rank 16/64/128, diffusers format, 418 attention/MLP/single-block
layers); baseline end-to-end image (bf16 eager pipeline + PEFT LoRA); then
``FluxEngine.from_pipeline(pipe, EngineOptions())`` on that random pipeline (the defaults; on an
H100/H200 fp8, regional, fused):
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

    from .fullsize import FLUX_DEV

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

    from .fullsize import make_lora, target_names

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
    (LORA_DIR / "paths.json").write_text(json.dumps(paths))
    return paths


def lora_paths(transformer):
    """The LoRA files an earlier process of this run wrote, else new ones."""
    if (LORA_DIR / "paths.json").exists():
        return json.loads((LORA_DIR / "paths.json").read_text())
    return write_loras(transformer)


def run(args, RESULT, save):
    import torch
    import torch._dynamo

    from fastlora_core.engine import FluxEngine, run_pipeline
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraSpec, LoraStack

    which = [c for c in (args.engine_configs or "cold").split(",") if c]
    mode = which[0]
    res = RESULT.setdefault("engine", {})
    res["mode"] = mode
    cache = os.environ.get("FASTLORA_BENCH_CACHE", "/tmp/fastlora-bench-cache")
    opts = EngineOptions(compile_cache_dir=cache)  # the defaults (auto -> fp8 + bf16 T5 on an H100/H200)
    res["options"] = repr(opts)
    if mode == "consumer24":
        return run_consumer24(args, res, save, cache)
    if mode in VARIANTS:
        return run_variant(args, res, save, cache, mode)
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

    torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    engine = FluxEngine.from_pipeline(pipe, opts, label="random-flux-dev")  # the random build, not a load
    torch.cuda.synchronize()
    res["engine_build_s"] = round(time.perf_counter() - t_load, 1)
    res["resolved_options"] = repr(engine.options)
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
    import torch._inductor.config as ic

    from .fullsize import Inputs, profile_step, run_loop, time_loops

    res["inductor_flags"] = {k: getattr(ic, k, None) for k in
                             ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                              "max_autotune", "epilogue_fusion", "freezing")}
    with torch.inference_mode():
        inp = Inputs(steps=args.steps)
        res["engine_transformer_loop"] = time_loops(lambda: run_loop(engine.transformer, inp), args.loops)
        save()
        res["profile_one_forward"] = profile_step(engine.transformer, inp, top=25)
        save()
        engine.apply(LoraStack())
        res["engine_transformer_loop_nolora"] = time_loops(lambda: run_loop(engine.transformer, inp), args.loops)
        engine.apply(stackA)
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
    ram64, reports = [], []
    for label in ("B64", "A64", "B64", "A64"):
        rep = engine.apply(LoraStack.of((paths[label], 1.0)))
        ram64.append(round(rep.swap_ms, 1))
        reports.append({k: rep.as_dict()[k] for k in ("swap_ms", "read_ms", "stage_ms", "from_cache")})
    sw["r64_from_ram_ms_median"] = statistics.median(ram64)
    sw["r64_from_ram_reports"] = reports
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


CONSUMER_GIB = 23.5  # what a 24 GB card (RTX 4090: 23.99 GiB) leaves to PyTorch after its CUDA context


def run_consumer24(args, res, save, cache):
    """The 24 GB consumer recipe through the engine, GPU memory capped at CONSUMER_GIB with
    ``torch.cuda.set_per_process_memory_fraction``: fp8 transformer, NF4 T5 (bitsandbytes), regional
    compile, adapter strategy (no bf16 master copy). The random pipeline is built on the GPU, then
    moved to system RAM before the cap is set, so the engine loads from RAM as it does from disk."""
    import torch

    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack

    from .fullsize import Inputs, run_loop, time_loops

    opts = EngineOptions(quantization="fp8", t5_quantization="nf4", compile="regional", swap_strategy="adapter",
                         compile_cache_dir=cache)
    res["options"] = repr(opts)
    pipe = build_pipeline()
    paths = lora_paths(pipe.transformer)
    pipe.to("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    frac = CONSUMER_GIB * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(frac, 0)
    torch.cuda.reset_peak_memory_stats()
    res["memory_cap_gib"] = CONSUMER_GIB
    res["memory_fraction"] = round(frac, 4)
    req = GenerateRequest(prompt="a photo of a cat on a red sofa", seed=0, steps=args.steps, width=1024, height=1024)
    stackA = LoraStack.of((paths["A64"], 1.0))
    try:
        t_load = time.perf_counter()
        engine = FluxEngine.from_pipeline(pipe, opts, label="random-flux-dev-consumer")
        torch.cuda.synchronize()
        res["engine_build_s"] = round(time.perf_counter() - t_load, 1)
        res["resolved_options"] = repr(engine.options)
        res["peak_gib_after_build"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        save()
        t0 = time.perf_counter()
        r = engine.generate(req, stackA)
        res["first_image_s_after_engine_build"] = round(time.perf_counter() - t0, 1)
        res["first_image_new_compiles"] = r.new_compiles
        save()
        res["e2e_s_per_image"] = [round(engine.generate(req, stackA).seconds, 3) for _ in range(2)]
        ms = []
        for label in ("B64", "A64", "B64", "A64"):
            ms.append(round(engine.apply(LoraStack.of((paths[label], 1.0))).swap_ms, 1))
        res["swap_r64_from_ram_ms"] = ms
        with torch.inference_mode():
            inp = Inputs(steps=args.steps)
            res["engine_transformer_loop"] = time_loops(lambda: run_loop(engine.transformer, inp), args.loops)
        res["fits"] = True
    except torch.OutOfMemoryError as exc:
        res["fits"] = False
        res["oom"] = str(exc)[:1500]
    res["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    save()


TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.")


def _fp8_image_stream_only(module, fqn):
    """Quantisation filter for the ``fp8_txtbf16`` variant: text-stream linears (M = 512 tokens) stay
    bf16, where fp8 GEMM + activation quantisation is slower than bf16 (RESULTS.md micro table)."""
    import torch

    return (isinstance(module, torch.nn.Linear) and module.in_features >= 16 and module.out_features >= 16
            and not any(t in fqn for t in TEXT_STREAM))


VARIANTS = {
    # name: (EngineOptions overrides, patch)
    "bf16": ({"quantization": "none"}, None),
    "fp8txtbf16": ({"quantization": "fp8"}, "text_stream_bf16"),
    "adapter": ({"quantization": "fp8", "swap_strategy": "adapter"}, None),
    "full": ({"quantization": "fp8", "compile": "full"}, None),
    "dynamic": ({"quantization": "fp8", "dynamic_shapes": True}, None),
}


def run_variant(args, res, save, cache, mode):
    """One engine option set in its own process (cold compile cache per variant): engine build,
    first image, whole images, the transformer loop with and without the LoRA, swaps from RAM."""
    import statistics as st

    import torch

    import fastlora_core.optimize as optimize
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack

    from .fullsize import Inputs, profile_step, run_loop, time_loops

    overrides, patch = VARIANTS[mode]
    if patch == "text_stream_bf16":
        optimize._is_quantizable_linear = _fp8_image_stream_only
    opts = EngineOptions(compile_cache_dir=f"{cache}-{mode}", **overrides)
    res["options"] = repr(opts)
    res["patch"] = patch
    pipe = build_pipeline()
    paths = lora_paths(pipe.transformer)
    req = GenerateRequest(prompt="a photo of a cat on a red sofa", seed=0, steps=args.steps, width=1024, height=1024)
    stackA = LoraStack.of((paths["A64"], 1.0))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = FluxEngine.from_pipeline(pipe, opts, label=f"random-flux-dev-{mode}")
    res["resolved_options"] = repr(engine.options)
    r = engine.generate(req, stackA)
    res["first_image_s_incl_engine_build"] = round(time.perf_counter() - t0, 1)
    res["first_image_new_compiles"] = r.new_compiles
    save()
    res["e2e_s_per_image"] = [round(engine.generate(req, stackA).seconds, 3) for _ in range(2)]
    with torch.inference_mode():
        inp = Inputs(steps=args.steps)
        res["loop_lora_A64"] = time_loops(lambda: run_loop(engine.transformer, inp), args.loops)
        save()
        engine.apply(LoraStack())
        res["loop_nolora"] = time_loops(lambda: run_loop(engine.transformer, inp), 2)
        save()
        engine.apply(stackA)
        if mode in ("fp8txtbf16", "adapter"):
            res["profile_one_forward"] = profile_step(engine.transformer, inp, top=12)
    reps = [engine.apply(LoraStack.of((paths[k], 1.0))) for k in ("B64", "A64", "B64", "A64", "B64")]
    ms = [round(r.swap_ms, 1) for r in reps]
    res["swap_r64_from_ram_ms"] = ms
    res["swap_r64_reports"] = [{k: r.as_dict()[k] for k in ("swap_ms", "read_ms", "stage_ms", "from_cache")}
                               for r in reps]
    res["fast_fp8_requant"] = getattr(engine.strategy, "_fast_fp8", None)
    res["swap_r64_from_ram_ms_median"] = st.median(ms[1:])
    res["compiles_total"] = engine.compiles
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save()
