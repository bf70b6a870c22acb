"""Swap time of the engine's fused strategy on a full-size Flux.1-dev transformer (random bf16
weights, fp8 per-row), no compile: rank-64 LoRAs on attention, MLP and single-block layers,
staged on the GPU (the engine's device LoRA cache), alternating A/B, CUDA-synchronised.

``--kinds lora,lokr,dora,lokr+lora`` also times, on the same layers and in the same process:
``lokr``: LyCORIS LoKr as SimpleTuner trains Flux (full ``w1`` / ``w2``, factor 16 on attention,
8 on MLPs; bf16), ``dora``: a rank-64 LoRA with a DoRA ``dora_scale`` per output row, and
``lokr+lora``: a LoKr and a rank-64 LoRA stacked.

    python benchmarks/bench_swap.py --out results.json [--kinds lora,lokr,dora,lokr+lora]
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
    parser.add_argument("--kinds", default="lora")
    parser.add_argument("--swaps", type=int, default=9)
    args = parser.parse_args()
    from diffusers import FluxTransformer2DModel

    from fastlora_core.lora.base import ResolvedEntry
    from fastlora_core.lora.fit import flux_lora_targets
    from fastlora_core.lora.fused import FusedStrategy
    from fastlora_core.lora.types import DenseLayer, LoraLayer, NormalizedLora
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

    def factorization(dim: int, factor: int) -> tuple[int, int]:  # LyCORIS' rule for factor > 0
        m = factor if dim % factor == 0 and dim >= factor**2 else 1
        return min(m, dim // m), max(m, dim // m)

    def lokr(seed: int) -> NormalizedLora:
        g = torch.Generator(device="cuda").manual_seed(seed)
        layers = {}
        for n in targets:
            out_f, in_f = mods[n].weight.shape
            factor = 8 if (".ff" in n or "proj_mlp" in n or n.endswith("proj_out")) else 16
            (a, b), (c, d) = factorization(out_f, factor), factorization(in_f, factor)
            w1 = torch.randn(a, c, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
            w2 = torch.randn(b, d, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01
            layers[n] = DenseLayer("lokr", {"w1": w1, "w2": w2}, 1.0, (out_f, in_f))
        return NormalizedLora(f"lokr{seed}", "kohya", layers)

    def dora(seed: int) -> NormalizedLora:
        base = lora(seed)
        layers = {}
        for n, layer in base.transformer.items():
            w = strategy._hp_master[n].float()
            magnitude = torch.linalg.vector_norm(w, dim=1) * 1.01
            layers[n] = DenseLayer("lora", {"down": layer.down, "up": layer.up}, 1.0, tuple(w.shape),
                                   None, magnitude, "out", float(torch.finfo(torch.float32).eps))
        return NormalizedLora(f"dora{seed}", "kohya", layers)

    def timed(stacks: list[list[ResolvedEntry]]) -> dict[str, object]:
        times = []
        for i in range(args.swaps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            strategy.apply(stacks[i % 2])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        torch.cuda.synchronize()
        t = time.perf_counter()
        strategy.apply([])
        torch.cuda.synchronize()
        restore_ms = (time.perf_counter() - t) * 1000
        return {"swap_ms_all": times, "swap_ms_median_after_first": statistics.median(times[1:]),
                "first_swap_ms": times[0], "restore_ms": restore_ms,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    makers = {"lora": lora, "lokr": lokr, "dora": dora}
    kinds: dict[str, object] = {}
    for kind in args.kinds.split(","):
        parts = kind.split("+")
        a = [ResolvedEntry((f"{p}a", 0, 0), makers[p](1 + j), 1.0) for j, p in enumerate(parts)]
        b = [ResolvedEntry((f"{p}b", 0, 0), makers[p](11 + j), 1.0) for j, p in enumerate(parts)]
        torch.cuda.reset_peak_memory_stats()
        kinds[kind] = {"bytes_per_file": [e.lora.nbytes() for e in a], **timed([a, b])}
        print(kind, json.dumps(kinds[kind]), flush=True)
        del a, b
        torch.cuda.empty_cache()
    first = kinds[args.kinds.split(",")[0]]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": args.rank,
              "layers": len(targets), "triton_path": strategy._fast_fp8, **first,  # type: ignore[dict-item]
              "kinds": kinds, "build_s": build_s, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
