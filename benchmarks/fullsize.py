"""The full-size random Flux.1-dev transformer every GPU benchmark measures, and the helpers they
share: random rank-r LoRAs with a set relative size, fixed inputs for a 28-step loop, timing and a
kernel profile by category. CUDA only. Imported by bench_flux.py (the runner), bench_engine.py (the
engine group it runs), bench_model_path.py and determinism.py, so no benchmark imports another's
runner.
"""

from __future__ import annotations

import math
import statistics
import time

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
DOUBLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"]
SINGLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


def sync():
    import torch

    torch.cuda.synchronize()


def build_transformer(seed=0, config=None):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            m = FluxTransformer2DModel(**(config or FLUX_DEV))
    finally:
        torch.set_default_dtype(prev)
    m = m.to(torch.bfloat16).eval().requires_grad_(False)
    return m


def target_names(model):
    names = []
    for i in range(len(model.transformer_blocks)):
        names += [f"transformer_blocks.{i}.{t}" for t in DOUBLE_TARGETS]
    for i in range(len(model.single_transformer_blocks)):
        names += [f"single_transformer_blocks.{i}.{t}" for t in SINGLE_TARGETS]
    return names


def make_lora(model, names, rank, seed, rel=0.05, device="cuda"):
    """Random LoRA: name -> (down [r,in], up [out,r]) bf16 with |BA| ~ rel * |W| per layer (alpha = r)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for n in names:
        lin = model.get_submodule(n)
        o, i = lin.out_features, lin.in_features
        down = torch.randn(rank, i, generator=g, device="cuda", dtype=torch.bfloat16) / math.sqrt(i)
        up = torch.randn(o, rank, generator=g, device="cuda", dtype=torch.bfloat16) * (rel / math.sqrt(3 * rank))
        if device != "cuda":
            down, up = down.cpu().pin_memory(), up.cpu().pin_memory()
        out[n] = (down, up)
    return out


def peft_state_dict(lora):
    sd = {}
    for n, (down, up) in lora.items():
        sd[f"{n}.lora_A.weight"] = down
        sd[f"{n}.lora_B.weight"] = up
    return sd


class Inputs:
    def __init__(self, height=1024, width=1024, text_len=512, steps=28, seed=123):
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        h, w = height // 16, width // 16
        self.steps = steps
        self.hidden = torch.randn(1, h * w, 64, generator=g, device="cuda", dtype=torch.bfloat16)
        self.enc = torch.randn(1, text_len, 4096, generator=g, device="cuda", dtype=torch.bfloat16)
        self.pooled = torch.randn(1, 768, generator=g, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(h, w, 3, device="cuda")
        ids[..., 1] = torch.arange(h, device="cuda")[:, None]
        ids[..., 2] = torch.arange(w, device="cuda")[None, :]
        self.img_ids = ids.reshape(h * w, 3)
        self.txt_ids = torch.zeros(text_len, 3, device="cuda")
        self.guidance = torch.full((1,), 3.5, device="cuda", dtype=torch.float32)
        sig = torch.linspace(1.0, 1.0 / steps, steps, device="cuda", dtype=torch.float32)
        self.ts = [sig[i:i + 1].clone() for i in range(steps)]
        self.dt = -1.0 / steps


def forward(model, x, inp, i):
    return model(hidden_states=x, encoder_hidden_states=inp.enc, pooled_projections=inp.pooled,
                 timestep=inp.ts[i], img_ids=inp.img_ids, txt_ids=inp.txt_ids, guidance=inp.guidance,
                 return_dict=False)[0]


def run_loop(model, inp, steps=None):
    x = inp.hidden.clone()
    for i in range(steps or inp.steps):
        v = forward(model, x, inp, i)
        x = x + inp.dt * v
    return x


def time_loops(fn, loops, warmup=1):
    import torch

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def lora_effect(o_with, o_without, r_with, r_without):
    """How much of the bf16 LoRA effect survives: norm ratio, cosine and relative error of the delta."""
    import torch

    d, r = (o_with.float() - o_without.float()).flatten(), (r_with.float() - r_without.float()).flatten()
    return {"norm_ratio": round(float(d.norm() / r.norm()), 4),
            "cosine": round(float(torch.dot(d, r) / (d.norm() * r.norm())), 4),
            "kept_projection": round(float(torch.dot(d, r) / torch.dot(r, r)), 4),
            "delta_rel_err": round(float((d - r).norm() / r.norm()), 4)}


def dynamo_counts():
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]), "frames_ok": int(counters["frames"]["ok"])}


def quantize_fp8(model, filter_extra=None):
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def flt(m, fqn):
        ok = isinstance(m, torch.nn.Linear) and m.in_features >= 16 and m.out_features >= 16
        return ok and "lora_" not in fqn and (filter_extra is None or filter_extra(m, fqn))

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=flt)


def compile_regional(model, inp):
    """Regional compile (``fullgraph``) and the first forward; returns those seconds."""
    t0 = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True)
    forward(model, inp.hidden, inp, 0)
    sync()
    return round(time.perf_counter() - t0, 1)


def profile_step(model, inp, top=40):
    """Kernel time of one forward by category (GEMM, attention, inductor Triton, other)."""
    from torch.profiler import ProfilerActivity, profile

    x = inp.hidden.clone()
    forward(model, x, inp, 0)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(model, x, inp, 0)
        sync()
    rows = []
    cats = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        name = e.key
        low = name.lower()
        if any(s in low for s in ("fmha", "flash", "attention", "sdpa", "cudnn_generated", "fprop")):
            cat = "attention"
        elif any(s in low for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "scaled_mm", "matmul")):
            cat = "gemm"
        elif low.startswith("triton_"):
            cat = "triton_fused"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0) + t
        rows.append((t, e.count, cat, name[:120]))
    rows.sort(reverse=True)
    total = sum(cats.values())
    return {"total_ms": round(total / 1000, 3), "by_category_ms": {k: round(v / 1000, 3) for k, v in cats.items()},
            "top": [{"ms": round(t / 1000, 3), "count": c, "cat": cat, "name": n} for t, c, cat, n in rows[:top]]}
