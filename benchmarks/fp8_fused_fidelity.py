"""How much of a LoRA's effect survives when it is merged into fp8 (e4m3, per-row) weights?

CPU-only analysis on one Flux-sized linear layer (3072x3072, weights ~N(0, 0.02) in bf16, a rank-64
delta scaled to a given fraction of the weight norm). Compares, on the layer's output for random
inputs:
- fp8-fused from a bf16 master: Q(W + D)           (our fused strategy)
- fp8-fused from the fp8 bytes:  Q(dequant(Q(W)) + D) (half the master memory)
- fp8-adapter:                   Q(W) + D           (the published recipe: delta in a bf16 side path)
Metrics: distance to the bf16 ideal x(W+D)^T (relative), and the LoRA effect kept = projection of
(out - out_fp8_base) onto the intended effect x D^T (1.0 = all of it, no systematic loss).

    python benchmarks/fp8_fused_fidelity.py
"""

from __future__ import annotations

import torch


def q_rowwise(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn).float() * scale


def main() -> None:
    torch.manual_seed(0)
    out_f, in_f, rank = 3072, 3072, 64
    w = (torch.randn(out_f, in_f) * 0.02).bfloat16().float()
    x = torch.randn(256, in_f)
    base = x @ q_rowwise(w).T
    print(f"{'|D|/|W|':>8} | {'distance to bf16+LoRA':^38} | {'LoRA effect kept':^38}")
    print(f"{'':>8} | {'fused(bf16 master)':>18} {'fused(fp8 bytes)':>9} {'adapter':>8} | "
          f"{'fused(bf16 master)':>18} {'fused(fp8 bytes)':>9} {'adapter':>8}")
    for rel in (0.002, 0.01, 0.03, 0.1):
        d = torch.randn(out_f, rank) @ torch.randn(rank, in_f)
        d = d * (rel * w.norm() / d.norm())
        ideal, want = x @ (w + d).T, x @ d.T
        outs = {
            "master": x @ q_rowwise(w + d).T,
            "bytes": x @ q_rowwise(q_rowwise(w) + d).T,
            "adapter": x @ (q_rowwise(w) + d).T,
        }
        dist = {k: float((v - ideal).norm() / ideal.norm()) for k, v in outs.items()}
        kept = {k: float(((v - base) * want).sum() / (want * want).sum()) for k, v in outs.items()}
        print(f"{rel:>8} | {dist['master']:>18.4f} {dist['bytes']:>16.4f} {dist['adapter']:>8.4f} | "
              f"{kept['master']:>18.3f} {kept['bytes']:>16.3f} {kept['adapter']:>8.3f}")


if __name__ == "__main__":
    main()
