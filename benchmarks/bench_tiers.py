"""Memory tiers: the engine on an H200 capped like a 24 GB or a 16 GB card.

    python -m benchmarks.bench_tiers --out DIR [--tiers 24gb_fused,24gb_adapter,16gb_fused,16gb_model]
                                     [--budget 300]

Each tier runs in its own process: the full-size random Flux.1-dev pipeline is built on the GPU
(``bench_engine.build_pipeline``; rank-64 LoRA files from ``bench_engine.lora_paths``), moved to system
RAM, then GPU memory is capped with ``torch.cuda.set_per_process_memory_fraction`` (what a card of
that size leaves to PyTorch after its CUDA context: 23.5 GiB for 24 GB, 15.5 GiB for 16 GB) and the
engine is built from RAM with the tier's options. Recorded: engine build, first image (cold compile
cache of its own), two more images, the transformer loop, swaps between two rank-64 LoRAs from the
RAM cache, peak allocated / reserved GPU memory, and whether it fit (an OOM is recorded, not
raised). The 16 GB tiers run in order and stop at the first that fits (``--all`` runs them all).
A tier named twice runs twice (``<tier>-2.json``; the device tool returns only files named in letters,
digits, '.', '_' and '-') with one compile cache folder: the second run starts with the graphs the first
saved.
A tier name ending in ``_bgcompile`` runs that tier with ``FASTLORA_BACKGROUND_COMPILE=1`` (decision 41:
the blocks run uncompiled while worker processes compile them). The cap is per process, so a worker's
GPU memory is outside it: ``device_used_peak_gib`` (every tier) samples the whole GPU's used memory
(``cudaMemGetInfo``, every 50 ms: this process's CUDA context and reserve plus any worker's), which
is what must fit on the real card; ``saved_blocks`` says how many block calls ran uncompiled.
``--own-loader`` builds each engine the way a user's load does, ``registry.get_engine`` on the model
saved once as a diffusers folder (FastLoRA's own modules, read from the page cache), instead of
``FluxEngine.from_pipeline`` on diffusers' modules: saved and background-compiled blocks (decisions
40, 41) exist only for FastLoRA's own transformer.
``16gb_model`` is the MODEL path: a transformer-only engine sampling given conditioning (the
text encoders and VAE are ComfyUI's nodes there, which ComfyUI moves off the GPU while sampling);
``e2e_s_per_image`` is then the 28-step denoising without text encoding and VAE decode. With
``--own-loader`` it is the engine a ComfyUI MODEL load builds (``ModelSource.transformer_alone`` on the
saved folder: FastLoRA's own transformer, saved blocks), and an "image" is the 28 transformer steps of
``fullsize.run_loop`` on fixed inputs (FastLoRA's own pipeline samples from prompts, not given
conditioning). (``fp8``
with ``offload=model`` is refused by the engine: quantised weights cannot be moved.)
``48gb_model`` is the MODEL path on a 48 GB card (44 GiB cap), where decision 64 keeps the masters on
the GPU; ``48gb_model_masters_in_ram`` is the same under the rule before it (masters in system RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: tier -> (cap in GiB, EngineOptions overrides)
TIERS: dict[str, tuple[float, dict[str, object]]] = {
    "24gb_fused": (23.5, {"quantization": "fp8", "t5_quantization": "nf4", "swap_strategy": "fused"}),
    # The ``flux_24gb_consumer`` workflow's settings: no bf16 masters, LoRA branches padded to max_rank.
    "24gb_adapter": (23.5, {"quantization": "fp8", "t5_quantization": "nf4", "swap_strategy": "adapter",
                            "max_rank": 128}),
    "16gb_fused": (15.5, {"quantization": "fp8", "t5_quantization": "nf4", "swap_strategy": "fused"}),
    # The MODEL path: a transformer-only engine; T5 / CLIP / VAE are ComfyUI's own nodes, which ComfyUI
    # moves off the GPU while the sampler runs (here: conditioning given, no encoders, no VAE).
    "16gb_model": (15.5, {"quantization": "fp8", "swap_strategy": "fused"}),
    "16gb_model_adapter": (15.5, {"quantization": "fp8", "swap_strategy": "adapter", "max_rank": 64}),
    # A 48 GB card (L40S, RTX 6000 Ada) on the MODEL path: the masters stay on the GPU (decision 64).
    "48gb_model": (44.0, {"quantization": "fp8", "swap_strategy": "fused"}),
    # The same card under the rule before decision 64 (masters in system RAM below 64 GiB free).
    "48gb_model_masters_in_ram": (44.0, {"quantization": "fp8", "swap_strategy": "fused"}),
}
SIXTEEN = ("16gb_fused", "16gb_model", "16gb_model_adapter")
TRANSFORMER_ONLY = ("16gb_model", "16gb_model_adapter", "48gb_model", "48gb_model_masters_in_ram")
BACKGROUND = "_bgcompile"  # tier suffix: the same tier with background compile workers (decision 41)


class DeviceMemory:
    """The whole GPU's used memory, sampled on a thread (all processes: the cap of
    ``set_per_process_memory_fraction`` does not cover a background compile worker)."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        import torch

        self.peak = 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(interval):
                free, total = torch.cuda.mem_get_info()
                self.peak = max(self.peak, total - free)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**30, 2)


#: where ``--own-loader`` saves the random model as a diffusers folder (once per machine)
MODEL_DIR = Path("/tmp/fastlora-tiers-model")


def worker(tier: str, out: Path, steps: int, own_loader: bool = False) -> None:
    import torch

    from fastlora_core import registry
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

    from .bench_engine import LORA_DIR, build_pipeline, lora_paths
    from .fullsize import Inputs, run_loop, time_loops

    cap, overrides = TIERS[tier.removesuffix(BACKGROUND)]
    res: dict[str, object] = {"tier": tier, "cap_gib": cap, "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1, default=str))

    if tier.removesuffix(BACKGROUND) == "48gb_model_masters_in_ram":
        from fastlora_core import optimize

        optimize.TRANSFORMER_ONLY_ROOM_BYTES = optimize.AMPLE_ROOM_BYTES  # the rule before decision 64
    opts = EngineOptions(compile="regional", compile_cache_dir=f"/tmp/fastlora-tiers-cache-{tier}", **overrides)  # type: ignore[arg-type]
    res["options"] = repr(opts)
    alone = tier.removesuffix(BACKGROUND) in TRANSFORMER_ONLY
    res["loader"] = "own (registry.get_engine on a diffusers folder)" if own_loader else "FluxEngine.from_pipeline"
    saved = (MODEL_DIR / "model_index.json").exists() and (LORA_DIR / "paths.json").exists()
    pipe = None if own_loader and saved else build_pipeline()  # an earlier tier saved both: no rebuild
    paths = lora_paths(pipe.transformer if pipe is not None else None)
    if own_loader and pipe is not None:  # what a user's load runs: FastLoRA's own modules, saved blocks
        if not (MODEL_DIR / "model_index.json").exists():
            pipe.save_pretrained(str(MODEL_DIR), max_shard_size="50GB")
        pipe = None
    if alone and pipe is not None:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=pipe.scheduler, vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=pipe.transformer)
    if pipe is not None:
        pipe.to("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total, 0)
    torch.cuda.reset_peak_memory_stats()
    device_memory = DeviceMemory()
    res["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    peaks: dict[str, list[float]] = {}  # phase -> [allocated, reserved] GiB at its peak

    def phase_peak(name: str) -> None:
        """Where the memory peak lies: each phase's peaks, then the counters reset for the next."""
        peaks[name] = [round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       round(torch.cuda.max_memory_reserved() / 2**30, 2)]
        res["phase_peaks_gib"] = peaks
        torch.cuda.reset_peak_memory_stats()

    save()
    req = GenerateRequest(prompt="a photo of a cat on a red sofa", seed=0, steps=steps, width=1024, height=1024)
    stack_a = LoraStack.of((paths["A64"], 1.0))
    from fastlora_core.optimize import dynamo_compile_count  # the MODEL tiers' images bypass engine.compiles

    compiles_before = dynamo_compile_count()
    try:
        t0 = time.perf_counter()
        if own_loader:
            source = (ModelSource.transformer_alone(MODEL_DIR) if alone else ModelSource.from_diffusers(str(MODEL_DIR)))
            engine = registry.get_engine(source, opts)
        else:
            engine = FluxEngine.from_pipeline(pipe, opts, label=f"random-flux-dev-{tier}")
        del pipe
        torch.cuda.synchronize()
        res["engine_build_s"] = round(time.perf_counter() - t0, 1)
        res["resolved_options"] = repr(engine.options)
        # Which modules the engine built: FastLoRA's own (``FluxRuntimePipeline``: saved blocks, compile
        # workers) or, where an option needs them, diffusers' (decision 39): a stand-down is visible here.
        res["pipeline"] = type(engine.pipe).__name__
        res["masters_on"] = str(getattr(engine.strategy, "master_device", "-"))
        res["peak_gib_after_build"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        phase_peak("build")
        save()
        if alone:  # the MODEL path: the engine's transformer driven from outside, as a sampler drives it
            if own_loader:  # the transformer's 28 steps on fixed inputs (see the module's docstring)
                loop_inputs = Inputs(steps=steps)

                def denoise() -> None:
                    run_loop(engine.transformer, loop_inputs)
            else:  # the diffusers pipeline's denoising loop on given conditioning
                g = torch.Generator().manual_seed(0)
                embeds = torch.randn(1, 512, 4096, generator=g).to("cuda", torch.bfloat16)
                pooled = torch.randn(1, 768, generator=g).to("cuda", torch.bfloat16)

                def denoise() -> None:
                    engine.pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=1024, width=1024,
                                num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                                generator=torch.Generator("cpu").manual_seed(0))

            def image(stack: LoraStack) -> float:
                engine.apply(stack)
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    denoise()
                torch.cuda.synchronize()
                return round(time.perf_counter() - t, 3)

            c0 = dynamo_compile_count()
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine.prepare_external(stack_a)  # compiles like the MODEL path's first sampling
            image(stack_a)
            res["first_image_s"] = round(time.perf_counter() - t0, 1)
            res["first_image_compiles"] = dynamo_compile_count() - c0
        else:
            def image(stack: LoraStack) -> float:
                return round(engine.generate(req, stack).seconds, 3)

            t0 = time.perf_counter()
            r = engine.generate(req, stack_a)
            res["first_image_s"] = round(time.perf_counter() - t0, 1)
            res["first_image_compiles"] = r.new_compiles
        phase_peak("first_image")
        save()
        res["e2e_s_per_image"] = [image(stack_a) for _ in range(2)]
        phase_peak("images")
        save()
        reps = [engine.apply(LoraStack.of((paths[k], 1.0))) for k in ("B64", "A64", "B64", "A64")]
        res["swap_r64_ms"] = [round(x.swap_ms, 1) for x in reps]
        phase_peak("swaps")
        res["image_after_swap_s"] = image(LoraStack.of((paths["B64"], 0.6)))
        phase_peak("image_after_swap")
        if engine.options.offload == "none":
            with torch.inference_mode():
                inp = Inputs(steps=steps)
                res["transformer_loop"] = time_loops(lambda: run_loop(engine.transformer, inp), 2)
            phase_peak("transformer_loop")
        if alone and res["masters_on"].startswith("cuda"):  # ComfyUI short of memory (decision 65)
            t = time.perf_counter()
            freed = engine.masters_to_ram()
            moved = {"s": round(time.perf_counter() - t, 2), "freed_gib": round(freed / 2**30, 2),
                     "allocated_gib_after": round(torch.cuda.memory_allocated() / 2**30, 2)}
            reps = [engine.apply(LoraStack.of((paths[k], 1.0))) for k in ("B64", "A64", "B64")]
            moved["swap_r64_ms_after"] = [round(x.swap_ms, 1) for x in reps]
            moved["image_after_s"] = image(stack_a)
            res["masters_to_ram"] = moved
            phase_peak("masters_to_ram")
        res["compiles_total"] = dynamo_compile_count() - compiles_before
        if engine.precompiled is not None:
            res["saved_blocks"] = engine.precompiled.report()
        res["fits"] = True
    except Exception as exc:  # noqa: BLE001 - an OOM (torch's, or the engine's wrapped one) is a result here
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        res["fits"] = False if oom else None
        res["oom" if oom else "error"] = f"{type(exc).__name__}: {exc}"[:1500]
    phase_peak("end")  # what the last phase (or a failed one) reached
    res["peak_allocated_gib"] = max(a for a, _ in peaks.values())
    res["peak_reserved_gib"] = max(r for _, r in peaks.values())
    res["device_used_peak_gib"] = device_memory.stop()
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiers", default="24gb_fused,16gb_fused,16gb_model")
    ap.add_argument("--all", action="store_true", help="run every 16 GB tier, not only up to the first that fits")
    ap.add_argument("--budget", type=float, default=300, help="seconds; a tier is skipped when < 60 s are left")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--own-loader", action="store_true",
                    help="build each engine with FastLoRA's own loader from a saved diffusers folder (what a user "
                         "runs; needed for saved and background-compiled blocks) instead of from a diffusers pipeline")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)  # the worker's JSON name
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker, out / f"{a.result or a.worker}.json", a.steps, a.own_loader)
        return
    deadline = time.time() + a.budget
    fitted16 = False
    seen: dict[str, int] = {}
    for tier in [t for t in a.tiers.split(",") if t]:
        if tier.removesuffix(BACKGROUND) not in TIERS:
            raise SystemExit(f"unknown tier {tier!r}: one of {', '.join(TIERS)}, each optionally + {BACKGROUND}")
        if tier in SIXTEEN and fitted16 and not a.all:
            continue
        left = deadline - time.time()
        if left < 60:
            print(f"skip {tier}: {left:.0f} s left", flush=True)
            continue
        print(f"tier {tier}", flush=True)
        # A tier named again runs again: ``<tier>-2.json``, with the same compile cache folder
        # (``/tmp/fastlora-tiers-cache-<tier>``), so that run starts with the graphs the first saved.
        seen[tier] = seen.get(tier, 0) + 1
        result = tier if seen[tier] == 1 else f"{tier}-{seen[tier]}"
        cmd = [sys.executable, "-m", "benchmarks.bench_tiers", "--out", str(out), "--worker", tier, "--result", result,
               "--steps", str(a.steps)] + (["--own-loader"] if a.own_loader else [])
        env = dict(os.environ, **({"FASTLORA_BACKGROUND_COMPILE": "1"} if tier.endswith(BACKGROUND) else {}))
        try:
            subprocess.run(cmd, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            print(f"{tier}: timed out", flush=True)
        f = out / f"{result}.json"
        data = json.loads(f.read_text()) if f.exists() else {}
        print(json.dumps({k: v for k, v in data.items() if k != "oom"}), flush=True)
        fitted16 = fitted16 or (tier in SIXTEEN and data.get("fits") is True)


if __name__ == "__main__":
    main()
