"""What the engine's swap to a never-used LoRA costs on the MODEL path, and a strength change.

    python -m benchmarks.bench_new_lora OUT.json [--swaps 6]

Full-size Flux.1-dev with random weights (the engine's defaults: fp8, fused, masters on the GPU;
compile off: a swap does not touch the graph), rank-64 LoRAs on the 418 attention/MLP layers written
as diffusers-format safetensors files. Each swap takes a LoRA as ComfyUI's loader hands it over:
opened again with ``safe_open`` (a new memory map of a file in the page cache, no page read yet),
put in the engine's LoRA cache as an in-memory LoRA whose values are not checked, and applied
(``FluxEngine.apply``, CUDA-synchronised): ``never_used``; then the same LoRA at another strength
(``strength_only``: the merge alone). Each is timed with the grouped fp8 merge (the default) and,
alternating in the same process, with the per-layer merge it replaced (``*_per_layer``). Then a
file never used before read by the engine itself, as ``Generate`` does (``file_never_used``: a
fresh copy of a file in the page cache each time, read into the process's own memory), alternating
with the read it replaced (``file_never_used_mapped_copy``: copied out of safetensors' mapping).
Medians in ms of ``swap_ms`` (the whole apply) and ``stage_ms``
(staging and the check), and the stager's own split of its last call. On a CPU (smoke run) the tiny
transformer, and the numbers mean nothing.

NOTES attempt 36 ran an earlier version of this script with variants for merging while staging
(commit e86f29c).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def main(out_path: str, swaps: int) -> None:
    import safetensors
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import save_file

    from benchmarks.fullsize import build_transformer, make_lora, target_names
    from fastlora_core.engine import FluxEngine
    from fastlora_core.loading import load_shipped_config
    from fastlora_core.lora.types import LoraLayer, NormalizedLora
    from fastlora_core.specs import EngineOptions, LoraSpec, LoraStack

    out = Path(out_path)
    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join(["python -m benchmarks.bench_new_lora", *sys.argv[1:]])}
    files = []
    if cuda:
        transformer = build_transformer()
        names = target_names(transformer)
        for seed in range(4):
            lora = make_lora(transformer, names, 64, seed + 1)
            files.append(f"/tmp/bench-new-lora-{seed}.safetensors")
            save_file({f"transformer.{n}.lora_{p}.weight": t.cpu().contiguous()
                       for n, (down, up) in lora.items() for p, t in (("A", down), ("B", up))}, files[-1])
            del lora
    else:  # the tiny transformer, to check the script on a CPU (its timings mean nothing)
        from diffusers import FluxTransformer2DModel

        from fastlora_core.tiny import (
            ATTN_TARGETS,
            TINY_TRANSFORMER_CONFIG,
            module_shapes,
            random_lora_state_dict,
        )

        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()
        names = list(ATTN_TARGETS)
        for seed in range(4):
            files.append(f"/tmp/bench-new-lora-tiny-{seed}.safetensors")
            save_file(random_lora_state_dict(module_shapes(transformer, names), 4, seed), files[-1])
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in load_shipped_config("scheduler_dev").items()
                                               if not k.startswith("_")})
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    options = EngineOptions(device="cuda", compile="off") if cuda else EngineOptions(device="cpu", dtype="float32",
                                                                                      compile="off")
    engine = FluxEngine.from_pipeline(pipe, options, label="random Flux.1-dev")
    res["engine_options"] = repr(engine.options)

    def as_comfyui_hands_it_over(path: str) -> str:
        with torch.inference_mode(), safetensors.safe_open(path, framework="pt", device="cpu") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        layers = {n: LoraLayer(t[f"transformer.{n}.lora_A.weight"], t[f"transformer.{n}.lora_B.weight"]) for n in names}
        return engine.lora_cache.put(NormalizedLora(path, "comfyui", layers, values_checked=False))

    def swap(path: str, strength: float = 1.0) -> tuple[float, float]:
        with torch.inference_mode():
            report = engine.apply(LoraStack((LoraSpec(path, strength),)))
        return round(report.swap_ms, 1), round(report.stage_ms, 1)

    swap(as_comfyui_hands_it_over(files[0]))  # warm: pinned chunks, kernels, the fp8 self-check
    strategy = engine.strategy
    grouped_target = strategy._grouped_target
    rows: dict[str, list[tuple[float, float]]] = {f"{k}{v}": [] for v in ("", "_per_layer")
                                                  for k in ("never_used", "strength_only")}
    for i in range(2 * swaps):  # alternating: the grouped fp8 merge (the default), then the per-layer one
        variant = "" if i % 2 == 0 else "_per_layer"
        strategy._grouped_target = grouped_target if not variant else lambda key, items: None  # type: ignore[method-assign]
        path = as_comfyui_hands_it_over(files[1 + i % (len(files) - 1)])  # a new mapping, a new in-memory LoRA
        rows["never_used" + variant].append(swap(path))
        rows["strength_only" + variant].append(swap(path, 0.6))
    strategy._grouped_target = grouped_target  # type: ignore[method-assign]
    res["grouped_layers"] = sum(v is not None for v in strategy._fp8_layers.values())

    # A file never used before, read by the engine itself (Generate's path): a fresh copy of a LoRA
    # file each time (a new path, in the page cache), read into the process's own memory by several
    # threads (the default) or, alternating, copied out of safetensors' memory mapping (before).
    from fastlora_core.lora import formats

    private = formats._private_tensors

    def mapped_copy(path: Path, f: Any) -> dict[str, torch.Tensor]:
        return {k: f.get_tensor(k).clone() for k in f.keys()}

    file_rows: dict[str, list[tuple[float, float, float]]] = {"file_never_used": [], "file_never_used_mapped_copy": []}
    for i in range(2 * swaps):
        variant = "file_never_used" if i % 2 == 0 else "file_never_used_mapped_copy"
        formats._private_tensors = private if i % 2 == 0 else mapped_copy  # type: ignore[assignment]
        fresh = f"{files[1 + i % (len(files) - 1)]}.copy{i}.safetensors"
        shutil.copyfile(files[1 + i % (len(files) - 1)], fresh)
        with torch.inference_mode():
            report = engine.apply(LoraStack((LoraSpec(fresh, 1.0),)))
        file_rows[variant].append((round(report.swap_ms, 1), round(report.read_ms, 1), round(report.stage_ms, 1)))
        Path(fresh).unlink()
    formats._private_tensors = private  # type: ignore[assignment]
    for label, frows in file_rows.items():
        res[label] = {"swap_ms": [r[0] for r in frows], "read_ms": [r[1] for r in frows], "stage_ms": [r[2] for r in frows],
                      "swap_median_ms": round(statistics.median(r[0] for r in frows), 1),
                      "read_median_ms": round(statistics.median(r[1] for r in frows), 1),
                      "stage_median_ms": round(statistics.median(r[2] for r in frows), 1)}
    for label, got in rows.items():
        res[label] = {"swap_ms": [s for s, _ in got], "stage_ms": [g for _, g in got],
                      "swap_median_ms": round(statistics.median(s for s, _ in got), 1),
                      "stage_median_ms": round(statistics.median(g for _, g in got), 1)}
    stager = engine.device_loras.stager
    res["last_stager_split_ms"] = {k: round(v, 1) for k, v in stager.last_ms.items()} if stager else None
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: (v["swap_median_ms"], v["stage_median_ms"]) if isinstance(v, dict) and "swap_median_ms" in v
                      else v for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--swaps", type=int, default=6)
    a = ap.parse_args()
    main(a.out, a.swaps)
