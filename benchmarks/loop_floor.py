"""The loop's floor with the memory-bound work counted (issue 13 item 3): arithmetic, not a measurement.

    python benchmarks/loop_floor.py [--gemm-ms 44.0] [--attention-ms 22.4] [--bandwidth-tbs 4.25] [--json]

NOTES.md's floor (~1.86 s per 28-step loop) counts the fp8 GEMMs and the attention at their measured
ceilings and nothing else. Between them the engine's kernels must still move bytes: a cuBLAS fp8 GEMM
writes bf16 and reads fp8 inputs, cuDNN's attention reads and writes bf16, so every norm, RoPE, GELU,
gate, residual and activation quantisation is at least one pass that reads what a GEMM wrote and writes
what the next one reads. This script counts those passes for Flux.1-dev at 1024x1024 with 512 text tokens,
fused as far as these kernels allow (see ``DOUBLE_PASSES``), and turns the bytes into milliseconds at a copy
rate: a lower bound, since no real kernel reaches the copy rate. A pass fused into a GEMM's epilogue or
prologue would need a GEMM other than cuBLAS's as ``torch._scaled_mm`` exposes it (bf16 output, no
epilogue): a CUTLASS or Triton template; inductor's max-autotune Triton templates lost to cuBLAS on the
GEMM alone (RESULTS.md, "Memory tiers, loop attempts").

The defaults are measured numbers (H200, NOTES.md "The two numbers"): the fp8 GEMMs of one forward at
their per-shape ceilings 44 ms, cuDNN's bf16 attention 22.4 ms (663 TFLOP/s), copy 4.25 TB/s; pass
``--attention-ms 16.1`` for cuDNN's FP8 attention as measured in the model (attempt 42).
"""

from __future__ import annotations

import argparse
import json

#: Flux.1-dev at 1024x1024 (64x64 latent patches) with 512 text tokens.
HIDDEN, MLP, DOUBLE_BLOCKS, SINGLE_BLOCKS = 3072, 12288, 19, 38
WIDE = MLP // HIDDEN  # the MLP's hidden width in units of HIDDEN
IMAGE_TOKENS, TEXT_TOKENS, STEPS = 4096, 512, 28
BF16, FP8 = 2, 1

#: Each block's passes between its GEMMs and attention: (what, bytes read, bytes written), per element of
#: one (all tokens x HIDDEN) tensor. The most fused form these kernels leave: every GEMM's and attention's
#: output read once, every GEMM's input written once in fp8 (one copy shared by the GEMMs that read the same
#: input), the residual stream read and written once per residual add, a block's first norm fused into the
#: previous block's last residual (the value is at hand, so it is not read again), v and the streams' join
#: written in place by the GEMMs. A double block runs its passes on the image and text streams (separate
#: weights, same widths), which together are all tokens; a single block on all tokens.
DOUBLE_PASSES: tuple[tuple[str, float, float], ...] = (
    ("norm1: modulation and fp8 quantisation for q/k/v (fused into the last residual)", 0, FP8),
    ("q, k: RMSNorm and RoPE", 2 * BF16, 2 * BF16),
    ("attention output: fp8 quantisation for the output projections", BF16, FP8),
    ("gate, residual, norm2, modulation, fp8 quantisation for the MLP", 2 * BF16, BF16 + FP8),
    (f"MLP hidden ({WIDE}x as wide): GELU, fp8 quantisation", WIDE * BF16, WIDE * FP8),
    ("gate, residual", 2 * BF16, BF16),
)
SINGLE_PASSES: tuple[tuple[str, float, float], ...] = (
    ("norm: modulation and fp8 quantisation for q/k/v/MLP (fused into the last residual)", 0, FP8),
    ("q, k: RMSNorm and RoPE", 2 * BF16, 2 * BF16),
    ("attention output and GELU of the MLP hidden, joined, fp8 quantisation for proj_out",
     (1 + WIDE) * BF16, (1 + WIDE) * FP8),
    ("gate, residual", 2 * BF16, BF16),
)


def floor(gemm_ms: float, attention_ms: float, bandwidth_tbs: float) -> dict[str, object]:
    """Bytes and milliseconds of the memory-bound passes per forward, and the loop they imply."""
    unit = (IMAGE_TOKENS + TEXT_TOKENS) * HIDDEN  # elements of one all-tokens x HIDDEN tensor

    def block_bytes(passes: tuple[tuple[str, float, float], ...]) -> float:
        return sum((read + write) * unit for _, read, write in passes)

    double, single = block_bytes(DOUBLE_PASSES), block_bytes(SINGLE_PASSES)
    per_forward = DOUBLE_BLOCKS * double + SINGLE_BLOCKS * single
    memory_ms = per_forward / (bandwidth_tbs * 1e12) * 1e3
    forward_ms = gemm_ms + attention_ms + memory_ms
    return {
        "double_block_mb": round(double / 1e6, 1), "single_block_mb": round(single / 1e6, 1),
        "memory_bound_gb_per_forward": round(per_forward / 1e9, 2), "memory_bound_ms": round(memory_ms, 2),
        "gemm_ms": gemm_ms, "attention_ms": attention_ms, "forward_ms": round(forward_ms, 2),
        "loop_s_without_memory_bound": round((gemm_ms + attention_ms) * STEPS / 1e3, 3),
        "loop_s": round(forward_ms * STEPS / 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemm-ms", type=float, default=44.0, help="fp8 GEMMs of one forward at their ceilings")
    ap.add_argument("--attention-ms", type=float, default=22.4, help="attention of one forward (57 calls)")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.25, help="device copy rate, TB/s")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    a = ap.parse_args()
    res = floor(a.gemm_ms, a.attention_ms, a.bandwidth_tbs)
    if a.json:
        print(json.dumps(res))
        return
    unit_mb = (IMAGE_TOKENS + TEXT_TOKENS) * HIDDEN / 1e6
    for name, passes in (("double block", DOUBLE_PASSES), ("single block", SINGLE_PASSES)):
        print(f"{name}:")
        for what, read, write in passes:
            print(f"  {(read + write) * unit_mb:7.1f} MB  {what}")
    for key, value in res.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
