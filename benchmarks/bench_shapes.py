"""New resolutions and text lengths on a compiled engine: static shapes (default: the first size gets
its own graph, the second one graph with dynamic shapes that later sizes reuse) vs
``dynamic_shapes=True`` (dynamic from the first compile).

Runs on any device with the tiny random Flux (no weights needed); a cold inductor cache per mode. The
first two calls use 16 text tokens, the tiny model's head size, so the dynamic graph is traced while the
text is as long as the head (ARCHITECTURE decision 58); later calls change the text length too.
Prints, per call: resolution, text tokens, new compiles, seconds; then one JSON line per mode.

    python benchmarks/bench_shapes.py [--device cpu|cuda] [--compile regional|full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = [(64, 64, 16), (80, 48, 16), (96, 96, 16), (112, 64, 24), (64, 64, 8), (80, 48, 16), (96, 96, 32)]


def worker(mode: str, device: str, compile_mode: str, model_dir: str) -> None:
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource

    dtype = "float32" if device == "cpu" else "bfloat16"
    engine = FluxEngine(ModelSource.from_diffusers(model_dir),
                        EngineOptions(device=device, dtype=dtype, compile=compile_mode,
                                      dynamic_shapes=(mode == "dynamic")))
    rows = []
    for w, h, text in SIZES:
        t = time.perf_counter()
        r = engine.generate(GenerateRequest(steps=4, width=w, height=h, max_sequence_length=text))
        rows.append({"size": f"{w}x{h}", "text": text, "new_compiles": r.new_compiles,
                     "s": round(time.perf_counter() - t, 3)})
    print(json.dumps({"mode": mode, "rows": rows}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="regional")
    p.add_argument("--worker", default="")
    p.add_argument("--model", default="")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.device, args.compile, args.model)
        return
    from fastlora_core.tiny import write_tiny_model

    tmp = tempfile.mkdtemp()
    model = str(write_tiny_model(os.path.join(tmp, "model")))
    for mode in ("static", "dynamic"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, f"cache-{mode}"), HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--device", args.device,
                              "--compile", args.compile, "--model", model],
                             env=env, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"\n{mode}: size text new_compiles seconds")
        for row in result["rows"]:
            print(f"  {row['size']:>7} {row['text']:>4} {row['new_compiles']:>3} {row['s']:>8}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
