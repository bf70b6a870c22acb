"""Loop attempts (issue 13 item 3): the 28-step transformer loop under other fp8 / compile choices.

    python -m benchmarks.bench_loop --out DIR [--attempts perrow,pertensor,max_autotune] [--budget 300]

Each attempt runs in its own process with its own (cold) inductor cache: the full-size random Flux.1-dev
transformer (``fullsize.build_transformer``) quantised by torchao and compiled per block
(``compile_repeated_blocks(fullgraph=True)``), as the engine does; then the first forward (compile),
the loop (1024x1024, 28 steps, median of 3) and one forward's kernel time by category. The fused LoRA
strategy merges the LoRA into these weights, so this is also the loop with a LoRA active.

- ``perrow``: the engine's default (``Float8DynamicActivationFloat8WeightConfig(PerRow())``,
  ``set_inductor_config=False``): the baseline of this call.
- ``pertensor``: one scale per tensor for weights and activations (cuBLAS tensor-wise fp8 GEMMs; the
  activation scale is one global reduction).
- ``max_autotune``: baseline quantisation, blocks compiled with ``mode="max-autotune-no-cudagraphs"``:
  inductor also benchmarks its Triton (scaled-)mm templates, which can take the activation
  quantisation into the GEMM's prologue/epilogue.
- ``pertensor_max_autotune``: both.
- ``perrow_contiguous``: the baseline with the engine's ``optimize.hand_over_contiguous`` (single blocks
  return tensors with standard strides, so the first one shares the others' graph: 2 graphs, not 3),
  to measure what that costs or saves in the loop and the compile.
- ``fp8_attention``: the baseline with every attention call through cuDNN's fused FP8 attention
  (``fastlora_core.fp8_attention``, the engine's ``attention="cudnn_fp8"``: a custom op inside the
  compiled blocks; needs ``nvidia-cudnn-frontend``).
- ``bf16``: no quantisation at all, for the error of the others.

Every attempt also saves its first forward's output (``<attempt>_forward.pt``; weights and inputs are
seeded, so all attempts see the same model); the parent reports each one's relative L2 distance to the
``bf16`` attempt's output when both ran (``fidelity.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ATTEMPTS = ("perrow", "pertensor", "max_autotune", "pertensor_max_autotune", "perrow_contiguous", "fp8_attention",
            "bf16")


def worker(attempt: str, out: Path, loops: int) -> None:
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    from fastlora_core.optimize import _is_quantizable_linear, hand_over_contiguous

    from .fullsize import (
        Inputs,
        build_transformer,
        dynamo_counts,
        forward,
        profile_step,
        run_loop,
        sync,
        time_loops,
    )

    res: dict[str, object] = {"attempt": attempt, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1, default=str))

    model = build_transformer()
    gran = PerTensor() if attempt.startswith("pertensor") else PerRow()
    if attempt != "bf16":
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False),
                  filter_fn=_is_quantizable_linear)
    if attempt == "fp8_attention":
        from fastlora_core import fp8_attention

        res["fp8_attention_layers"] = fp8_attention.install(model, torch.device("cuda", torch.cuda.current_device()))
    kwargs: dict[str, object] = {"fullgraph": True}
    if attempt.endswith("max_autotune"):
        kwargs["mode"] = "max-autotune-no-cudagraphs"
    res["compile_kwargs"] = kwargs
    if attempt.endswith("contiguous"):
        res["blocks_handing_over_contiguous"] = hand_over_contiguous(model)
    inp = Inputs()
    save()
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.compile_repeated_blocks(**kwargs)
        forward(model, inp.hidden, inp, 0)
        sync()
        res["compile_first_forward_s"] = round(time.perf_counter() - t0, 1)
        res["graphs"] = dynamo_counts()
        save()
        torch.save(forward(model, inp.hidden, inp, 0).cpu(), out.with_name(f"{attempt}_forward.pt"))
        res["loop"] = time_loops(lambda: run_loop(model, inp), loops)
        save()
        res["profile_one_forward"] = profile_step(model, inp, top=12)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--attempts", default="perrow,pertensor,max_autotune")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--loops", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker, out / f"{a.worker}.json", a.loops)
        return
    deadline = time.time() + a.budget
    for attempt in [x for x in a.attempts.split(",") if x]:
        if attempt not in ATTEMPTS:
            ap.error(f"unknown attempt {attempt}; choose from {', '.join(ATTEMPTS)}")
        left = deadline - time.time()
        if left < 45:
            print(f"skip {attempt}: {left:.0f} s left", flush=True)
            continue
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/fastlora-loop-{attempt}-{int(time.time())}")
        cmd = [sys.executable, "-m", "benchmarks.bench_loop", "--out", str(out), "--worker", attempt,
               "--loops", str(a.loops)]
        print(f"attempt {attempt}", flush=True)
        try:
            subprocess.run(cmd, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            print(f"{attempt}: timed out", flush=True)
        f = out / f"{attempt}.json"
        data = json.loads(f.read_text()) if f.exists() else {}
        print(json.dumps({k: v for k, v in data.items() if k != "profile_one_forward"}), flush=True)
    fidelity(out)


def fidelity(out: Path) -> None:
    """Each attempt's first forward against the ``bf16`` attempt's (relative L2), into ``fidelity.json``."""
    import torch

    reference = out / "bf16_forward.pt"
    if not reference.exists():
        return
    ref = torch.load(reference).float()
    result = {}
    for f in sorted(out.glob("*_forward.pt")):
        o = torch.load(f).float()
        result[f.name.removesuffix("_forward.pt")] = round(float((o - ref).norm() / ref.norm()), 5)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    print("relative L2 to bf16:", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
