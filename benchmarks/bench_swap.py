"""Swap time of the engine's fused strategy on a full-size Flux.1-dev transformer (random bf16
weights, fp8 per-row), no compile: rank-64 LoRAs on attention, MLP and single-block layers,
staged on the GPU (the engine's device LoRA cache), alternating A/B, CUDA-synchronised.

    python benchmarks/bench_swap.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_swap.json")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    from diffusers import FluxTransformer2DModel

    from fastlora_core.lora.base import ResolvedEntry
    from fastlora_core.lora.fit import flux_lora_targets
    from fastlora_core.lora.fused import FusedStrategy
    from fastlora_core.lora.types import LoraLayer, NormalizedLora
    from fastlora_core.optimize import quantize_transformer

    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                                       axes_dims_rope=[16, 56, 56]).to(torch.bfloat16)
    model.requires_grad_(False)
    build_s = time.perf_counter() - t0
    targets = [n for n in flux_lora_targets(model)
               if ("attn." in n or ".ff" in n or "proj_mlp" in n or "proj_out" in n) and "blocks." in n]
    strategy = FusedStrategy({"transformer": model}, "fp8", "cuda")
    strategy.capture_hp_masters(model, flux_lora_targets(model))
    quantize_transformer(model, "fp8")
    strategy.refresh_modules()
    mods = dict(model.named_modules())

    def lora(seed: int) -> NormalizedLora:
        g = torch.Generator(device="cuda").manual_seed(seed)
        layers = {}
        for n in targets:
            w = mods[n].weight
            layers[n] = LoraLayer(torch.randn(args.rank, w.shape[1], device="cuda", generator=g, dtype=torch.bfloat16) * 0.01,
                                  torch.randn(w.shape[0], args.rank, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01,
                                  1.0)
        return NormalizedLora(f"lora{seed}", "diffusers", layers)

    a = ResolvedEntry(("a", 0, 0), lora(1), 1.0)
    b = ResolvedEntry(("b", 0, 0), lora(2), 1.0)
    times = []
    for i in range(9):
        entry = a if i % 2 == 0 else b
        torch.cuda.synchronize()
        t = time.perf_counter()
        strategy.apply([entry])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    torch.cuda.synchronize()
    t = time.perf_counter()
    strategy.apply([])
    torch.cuda.synchronize()
    restore_ms = (time.perf_counter() - t) * 1000
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": args.rank,
              "layers": len(targets), "triton_path": strategy._fast_fp8, "swap_ms_all": times,
              "swap_ms_median_after_first": statistics.median(times[1:]), "first_swap_ms": times[0],
              "restore_ms": restore_ms, "build_s": build_s,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
