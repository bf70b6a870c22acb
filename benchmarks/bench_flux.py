"""FastLoRA GPU benchmark: full-size Flux.1-dev with random weights, one process per configuration group.

Usage (on a CUDA machine with diffusers, peft, torchao installed):

    python benchmarks/bench_flux.py --configs micro,eager,fp8_fused,fp8_adapter,fp8_fqkv \
        --out benchmarks/results/DATE-callN.json [--budget 540] [--loops 3]

Groups (each runs in its own Python process; results are merged into one JSON):
  micro        device ceilings (copy GB/s, bf16 mm, fp8 _scaled_mm), attention kernels on the Flux shape
               (SDPA default / flash / efficient / cuDNN, cuDNN FP8 through fastlora_core.fp8_attention), Flux
               GEMM shapes bf16 vs fp8 row-wise, row-wise fp8 requantisation (torchao vs Triton kernel).
  eager        bf16 eager without LoRA and with a rank-64 PEFT LoRA (unfused) = the baseline.
  fp8_fused    torchao fp8 dynamic per-row + regional compile, LoRA merged + re-quantised in place;
               swap times (rank 16/64/128, LoRA on GPU or in pinned RAM, torchao vs Triton requant,
               fp8-bytes master), 0 recompiles under error_on_recompile, bitwise check against a fresh
               quantisation, fidelity against bf16, a kernel-time profile, a whole-forward CUDA graph
               and (phase attn8) cuDNN FP8 attention.
  fp8_adapter  the published recipe: fp8 + regional compile + PEFT hotswap padded to rank 64.
  fp8_fqkv     fused QKV projections + fp8 + regional compile (+ CUDA graph), no LoRA (= fused speed).
  engine_cold  our engine through its public API (benchmarks/bench_engine.py): first image with a cold
               compile cache, seconds per image, swaps from disk / RAM cache, 22-swap sequence.
  engine_warm  a new process with the same compile cache: time to first image after a restart.

Model: FluxTransformer2DModel with the Flux.1-dev config (19 double + 38 single blocks, 3072 hidden,
24 heads x 128), random bf16 weights built on the GPU; 1024x1024 (4096 image tokens), 512 text tokens,
batch 1; a "loop" = 28 transformer forwards (+ the Euler update), CUDA-synchronised, median of --loops
after warm-up. LoRA: rank 64 on attention, MLP and single-block layers (418 linear layers).
"""

# ruff: noqa: B023  (benchmark lambdas are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fullsize import (  # noqa: E402  (needs ROOT on sys.path when run as a script)
    Inputs,
    build_transformer,
    compile_regional,
    dynamo_counts,
    forward,
    lora_effect,
    make_lora,
    peft_state_dict,
    profile_step,
    quantize_fp8,
    rel,
    run_loop,
    sync,
    target_names,
    time_loops,
)

RESULT: dict = {}
OUT_PATH: Path | None = None
DEADLINE = float("inf")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def save():
    if OUT_PATH is not None:
        OUT_PATH.write_text(json.dumps(RESULT, indent=1, default=str))


def left() -> float:
    return DEADLINE - time.time()


def phase(name):
    """Decorator-like helper: run fn, record errors, save after each phase."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                out = fn(*a, **k)
                RESULT.setdefault("phases_ok", []).append(name)
                return out
            except Exception as exc:  # noqa: BLE001
                RESULT.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"phase {name} FAILED: {exc}")
                traceback.print_exc()
                return None
            finally:
                RESULT.setdefault("phase_seconds", {})[name] = round(time.time() - t0, 1)
                save()
        return run
    return wrap


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def env_info():
    import torch

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    for mod in ("diffusers", "peft", "torchao", "triton", "transformers", "cudnn"):
        try:
            info[mod if mod != "cudnn" else "cudnn_frontend"] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing ({type(exc).__name__})"
    return info



def cudagraph_loop(model, inp):
    """Capture one whole transformer forward in a CUDA graph; returns (loop_fn, check_out)."""
    import torch

    sx = inp.hidden.clone()
    st = inp.ts[0].clone()

    def fwd():
        return model(hidden_states=sx, encoder_hidden_states=inp.enc, pooled_projections=inp.pooled,
                     timestep=st, img_ids=inp.img_ids, txt_ids=inp.txt_ids, guidance=inp.guidance,
                     return_dict=False)[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fwd()

    def loop():
        sx.copy_(inp.hidden)
        for i in range(inp.steps):
            st.copy_(inp.ts[i])
            g.replay()
            sx.add_(out, alpha=inp.dt)
        return sx

    def one(i=0):
        sx.copy_(inp.hidden)
        st.copy_(inp.ts[i])
        g.replay()
        return out.clone()

    return loop, one


# ---------------------------------------------------------------------------------------------------
# group: micro
# ---------------------------------------------------------------------------------------------------
def group_micro(args):
    import torch
    import torch.nn.functional as F

    def bench(fn, n=20, warm=3):
        for _ in range(warm):
            fn()
        sync()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        sync()
        return statistics.median(a.elapsed_time(b) for a, b in ev)  # ms

    res = RESULT.setdefault("micro", {})

    @phase("micro_ceilings")
    def ceilings():
        x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = bench(lambda: y.copy_(x))
        res["copy_GBps"] = round(2 * x.numel() / ms / 1e6, 1)
        x = y = None  # free 4 GiB
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = bench(lambda: a @ b)
        res["bf16_mm_8192_TFLOPs"] = round(2 * 8192**3 / ms / 1e9, 1)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        sa = torch.ones(8192, 1, device="cuda")
        sb = torch.ones(1, 8192, device="cuda")
        ms = bench(lambda: torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=True))
        res["fp8_rowwise_scaled_mm_8192_TFLOPs"] = round(2 * 8192**3 / ms / 1e9, 1)

    @phase("micro_gemm_shapes")
    def gemms():
        shapes = {  # (M, K, N, count per forward)
            "img_qkvo_3072x3072": (4096, 3072, 3072, 19 * 4), "txt_qkvo": (512, 3072, 3072, 19 * 4),
            "img_ff_up_3072x12288": (4096, 3072, 12288, 19), "img_ff_down_12288x3072": (4096, 12288, 3072, 19),
            "single_qkv_3072x3072": (4608, 3072, 3072, 38 * 3), "single_mlp_3072x12288": (4608, 3072, 12288, 38),
            "single_out_15360x3072": (4608, 15360, 3072, 38), "fused_qkv_3072x9216": (4608, 3072, 9216, 38),
            "single_qkv_mlp_3072x21504": (4608, 3072, 21504, 38), "mod_3072x18432_m1": (1, 3072, 18432, 19 * 2),
        }
        out = {}
        for name, (m, k, n, cnt) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            t16 = bench(lambda: F.linear(x, w))
            x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            sx, sw = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
            t8 = bench(lambda: torch._scaled_mm(x8, w8.t(), sx, sw, out_dtype=torch.bfloat16, use_fast_accum=True))
            fl = 2 * m * k * n
            out[name] = {"bf16_us": round(t16 * 1000, 1), "fp8_us": round(t8 * 1000, 1),
                         "bf16_TFLOPs": round(fl / t16 / 1e9, 1), "fp8_TFLOPs": round(fl / t8 / 1e9, 1),
                         "count_per_forward": cnt}
        res["gemm"] = out
        per_fwd8 = sum(v["fp8_us"] * v["count_per_forward"] for k, v in out.items()
                       if k not in ("fused_qkv_3072x9216", "single_qkv_mlp_3072x21504"))
        res["gemm_fp8_ms_per_forward_est"] = round(per_fwd8 / 1000, 2)

    @phase("micro_attention")
    def attention():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, h, s, d = 1, 24, 4608, 128
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        fl = 4 * b * h * s * s * d
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
        out = {}
        for name, be in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                if be is None:
                    fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                else:
                    def fn(be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(q, k, v)
                o = fn()
                ms = bench(fn)
                out[name] = {"us": round(ms * 1000, 1), "TFLOPs": round(fl / ms / 1e9, 1), "rel_err": round(rel(o, ref), 5)}
            except Exception as exc:  # noqa: BLE001
                out[name] = f"error: {exc}"[:300]
        try:
            from fastlora_core import fp8_attention as kernels

            qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, S, H, D]
            o = kernels.fp8_sdpa(qs, ks, vs).transpose(1, 2)
            ms = bench(lambda: kernels.fp8_sdpa(qs, ks, vs))
            q8, dq = kernels.to_fp8_per_tensor(qs)
            k8, dk = kernels.to_fp8_per_tensor(ks)
            v8, dv = kernels.to_fp8_per_tensor(vs)
            ms_core = bench(lambda: kernels.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, 1 / dv, 1 / math.sqrt(d)))
            out["cudnn_fp8"] = {"us": round(ms * 1000, 1), "TFLOPs": round(fl / ms / 1e9, 1),
                                "core_us": round(ms_core * 1000, 1), "core_TFLOPs": round(fl / ms_core / 1e9, 1),
                                "rel_err": round(rel(o, ref), 5)}
            # realistic q/k: RMS-normed rows with a learned-like gain, v with outliers
            qn = F.rms_norm(qs, (d,)) * (1 + torch.rand(d, device="cuda", dtype=torch.bfloat16))
            kn = F.rms_norm(ks, (d,)) * (1 + torch.rand(d, device="cuda", dtype=torch.bfloat16))
            vo = vs.clone()
            vo[..., :4] *= 20
            o8 = kernels.fp8_sdpa(qn, kn, vo)
            r = F.scaled_dot_product_attention(qn.transpose(1, 2).double(), kn.transpose(1, 2).double(),
                                               vo.transpose(1, 2).double()).transpose(1, 2)
            r16 = F.scaled_dot_product_attention(qn.transpose(1, 2), kn.transpose(1, 2), vo.transpose(1, 2)).transpose(1, 2)
            out["cudnn_fp8"]["rel_err_rmsnormed"] = round(rel(o8, r), 5)
            out["bf16_rel_err_rmsnormed"] = round(rel(r16, r), 5)
        except Exception as exc:  # noqa: BLE001
            out["cudnn_fp8"] = f"error: {type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
        res["attention_b1_h24_s4608_d128"] = out
        res["attention_ms_per_forward_default"] = round(out["default"]["us"] * 57 / 1000, 2) \
            if isinstance(out.get("default"), dict) else None

    @phase("micro_requant")
    def requant():
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        from fastlora_core import kernels

        out = {}
        for shape in ((3072, 3072), (12288, 3072), (3072, 15360)):
            w = (torch.randn(*shape, device="cuda") * 0.02).to(torch.bfloat16)
            fresh = Float8Tensor.from_hp(w, granularity=PerRow())
            q = torch.empty_like(fresh.qdata)
            s = torch.empty_like(fresh.scale)
            kernels.rowwise_fp8_quant_into(w, q, s.view(-1))
            same = bool(torch.equal(q.view(torch.uint8), fresh.qdata.view(torch.uint8))) and bool(torch.equal(s, fresh.scale))
            t_ao = bench(lambda: Float8Tensor.from_hp(w, granularity=PerRow()))
            t_tr = bench(lambda: kernels.rowwise_fp8_quant_into(w, q, s.view(-1)))
            out[f"{shape[0]}x{shape[1]}"] = {"torchao_us": round(t_ao * 1000, 1), "triton_us": round(t_tr * 1000, 1),
                                             "bitwise_equal": same,
                                             "triton_GBps": round(w.numel() * 3 / t_tr / 1e6, 1)}
        res["rowwise_requant"] = out

    ceilings()
    gemms()
    attention()
    requant()


# ---------------------------------------------------------------------------------------------------
# group: eager (baseline)
# ---------------------------------------------------------------------------------------------------
def group_eager(args):
    import torch

    res = RESULT.setdefault("eager", {})
    model = build_transformer()
    inp = Inputs(steps=args.steps)
    names = target_names(model)
    res["lora_layers"] = len(names)
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats()
        res["bf16_eager_nolora"] = time_loops(lambda: run_loop(model, inp), args.eager_loops)
        log("bf16 eager no lora", res["bf16_eager_nolora"])
        save()
        lora = make_lora(model, names, 64, seed=1)
        model.load_lora_adapter(peft_state_dict(lora), prefix=None, adapter_name="a")
        torch.cuda.reset_peak_memory_stats()
        res["bf16_eager_peft_r64"] = time_loops(lambda: run_loop(model, inp), args.eager_loops)
        log("bf16 eager peft", res["bf16_eager_peft_r64"])
        save()


# ---------------------------------------------------------------------------------------------------
# group: fp8_fused (our strategy, engine-less reference implementation)
# ---------------------------------------------------------------------------------------------------
class FusedSwapper:
    def __init__(self, model, names):
        import torch

        self.layers = {n: model.get_submodule(n) for n in names}
        self.master = {n: lin.weight.detach().clone() for n, lin in self.layers.items()}
        self.scratch = torch.empty(max(w.numel() for w in self.master.values()), dtype=torch.bfloat16, device="cuda")
        self.fp8_master = None

    def refresh(self):
        """After quantisation: keep the original fp8 bytes too (for the fp8-bytes master variant)."""
        self.fp8_master = {}
        for n, lin in self.layers.items():
            w = lin.weight
            self.fp8_master[n] = (w.qdata.clone(), w.scale.clone())

    def apply(self, lora, strength=1.0, use_triton=True, master="bf16"):

        from benchmarks import experimental_kernels as kernels

        for n, lin in self.layers.items():
            w = lin.weight
            down, up = lora[n] if lora is not None else (None, None)
            if down is not None and not down.is_cuda:
                down = down.to("cuda", non_blocking=True)
                up = up.to("cuda", non_blocking=True)
            if strength != 1.0 and up is not None:
                up = up * strength
            if master == "bf16":
                kernels.merge_requant_(w, self.master[n], down, up, self.scratch, use_triton=use_triton)
            else:  # from the original fp8 bytes: W = dequant(q0) + up @ down
                q0, s0 = self.fp8_master[n]
                if down is None:
                    w.qdata.copy_(q0)
                    w.scale.copy_(s0)
                    continue
                buf = self.scratch[: q0.numel()].view(q0.shape)
                buf.copy_(q0)
                buf.mul_(s0)
                buf.addmm_(up, down)
                kernels.rowwise_fp8_quant_into(buf, w.qdata, w.scale.view(-1))

    def merge_bf16_inplace(self, lora):
        """bf16 model (before quantisation): W = master + up @ down (None restores)."""
        import torch

        for n, lin in self.layers.items():
            if lora is None:
                lin.weight.copy_(self.master[n])
            else:
                down, up = lora[n]
                torch.addmm(self.master[n], up, down, out=lin.weight.data)

    def verify_against_fresh(self, lora):
        """Every layer's qdata/scale equals a fresh torchao quantisation of master + up @ down."""
        import torch
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        bad = 0
        for n, lin in self.layers.items():
            down, up = lora[n]
            merged = torch.addmm(self.master[n], up, down)
            fresh = Float8Tensor.from_hp(merged, granularity=PerRow())
            w = lin.weight
            if not (torch.equal(w.qdata.view(torch.uint8), fresh.qdata.view(torch.uint8))
                    and torch.equal(w.scale, fresh.scale)):
                bad += 1
        return bad


def group_fp8_fused(args):
    import torch
    import torch._dynamo

    res = RESULT.setdefault("fp8_fused", {})
    model = build_transformer()
    inp = Inputs(steps=args.steps)
    names = target_names(model)
    sw = FusedSwapper(model, names)
    loras = {"A64": make_lora(model, names, 64, seed=1), "B64": make_lora(model, names, 64, seed=2)}
    with torch.inference_mode():
        # bf16 eager references for fidelity (one forward each, step 0)
        ref = {}
        ref["none"] = forward(model, inp.hidden, inp, 0).clone()
        sw.merge_bf16_inplace(loras["B64"])
        ref["B64"] = forward(model, inp.hidden, inp, 0).clone()
        sw.merge_bf16_inplace(None)
        sync()
        t0 = time.perf_counter()
        quantize_fp8(model)
        sync()
        res["quantize_s"] = round(time.perf_counter() - t0, 2)
        sw.refresh()
        # apply LoRA A before compiling (fused: no per-step cost)
        sw.apply(loras["A64"])
        res["compile_first_forward_s"] = compile_regional(model, inp)
        res["dynamo_after_compile"] = dynamo_counts()
        log("compiled", res["compile_first_forward_s"])
        torch.cuda.reset_peak_memory_stats()
        res["loop_lora_A64"] = time_loops(lambda: run_loop(model, inp), args.loops)
        log("fp8 fused loop", res["loop_lora_A64"])
        save()

        @phase("fused_swaps")
        def swaps():
            torch._dynamo.config.error_on_recompile = True
            before = dynamo_counts()
            out = {}

            def tswap(label, lora, **kw):
                ts = []
                for _ in range(3):
                    sync()
                    t0 = time.perf_counter()
                    sw.apply(lora, **kw)
                    sync()
                    ts.append((time.perf_counter() - t0) * 1000)
                out[label] = {"median_ms": round(statistics.median(ts), 2), "all_ms": [round(t, 2) for t in ts]}

            sw.apply(loras["B64"])  # warm the Triton kernel
            tswap("r64_gpu_triton", loras["B64"])
            tswap("r64_gpu_torchao", loras["B64"], use_triton=False)
            tswap("restore_none_triton", None)
            loras["B64_cpu"] = {n: (d.cpu().pin_memory(), u.cpu().pin_memory()) for n, (d, u) in loras["B64"].items()}
            tswap("r64_pinned_ram_triton", loras["B64_cpu"])
            tswap("r64_gpu_fp8bytes_master", loras["B64"], master="fp8")
            for r in (16, 128):
                lo = make_lora(model, names, r, seed=10 + r)
                tswap(f"r{r}_gpu_triton", lo)
                del lo
            tswap("r64_strength_0.7", loras["B64"], strength=0.7)
            res["swap_ms"] = out
            # correctness: B64 applied via Triton equals a fresh torchao quantisation, layer by layer
            sw.apply(loras["B64"])
            res["swap_bitwise_mismatched_layers"] = sw.verify_against_fresh(loras["B64"])
            sw.apply(loras["B64"], use_triton=False)
            res["swap_bitwise_mismatched_layers_torchao_path"] = sw.verify_against_fresh(loras["B64"])
            o_B = forward(model, inp.hidden, inp, 0).clone()
            sw.apply(None)
            o_none = forward(model, inp.hidden, inp, 0).clone()
            sw.apply(loras["A64"])
            o_A = forward(model, inp.hidden, inp, 0).clone()
            # 20+ swap sequence: files (A/B), ranks, strengths, stacks (sum of two), restores
            seq = []
            lo16 = make_lora(model, names, 16, seed=16)
            stack = {n: (torch.cat([loras["A64"][n][0], lo16[n][0]]), torch.cat([loras["A64"][n][1], lo16[n][1]], 1))
                     for n in names}
            plan = [("A64", 1.0), ("B64", 1.0), ("A64", 0.5), ("r16", 1.0), ("stackA+16", 1.0), (None, 1.0),
                    ("B64", 0.8), ("r16", 0.3), ("A64", 1.0), ("stackA+16", 0.6)] * 2 + [("B64", 1.0), (None, 1.0)]
            src = {"A64": loras["A64"], "B64": loras["B64"], "r16": lo16, "stackA+16": stack, None: None}
            for key, s in plan:
                sync()
                t0 = time.perf_counter()
                sw.apply(src[key], strength=s)
                forward(model, inp.hidden, inp, 0)
                sync()
                seq.append(round((time.perf_counter() - t0) * 1000, 1))
            after = dynamo_counts()
            torch._dynamo.config.error_on_recompile = False
            res["swap_sequence"] = {"swaps": len(plan), "ms_swap_plus_forward": seq,
                                    "new_graphs": after["unique_graphs"] - before["unique_graphs"],
                                    "recompile_error": False}
            res["fidelity_vs_bf16"] = {
                "fp8_vs_bf16_nolora_rel": round(rel(o_none, ref["none"]), 4),
                "fp8_vs_bf16_B64_rel": round(rel(o_B, ref["B64"]), 4),
                "lora_B64_effect": lora_effect(o_B, o_none, ref["B64"], ref["none"]),
                "A_differs_from_B_rel": round(rel(o_A, o_B), 4),
            }
            sw.apply(None)
            res["restore_exact_after_sequence"] = bool(torch.equal(forward(model, inp.hidden, inp, 0), o_none))

        swaps()
        sw.apply(loras["A64"])
        torch._dynamo.config.error_on_recompile = False

        @phase("fused_profile")
        def prof():
            res["profile_one_forward"] = profile_step(model, inp)

        prof()

        @phase("fused_cudagraph")
        def cg():
            loop, one = cudagraph_loop(model, inp)
            o_ref = forward(model, inp.hidden, inp, 0).clone()
            same = rel(one(0), o_ref)
            torch.cuda.reset_peak_memory_stats()
            res["loop_lora_A64_cudagraph"] = time_loops(loop, args.loops)
            res["cudagraph_vs_eager_rel"] = round(same, 6)
            sw.apply(loras["B64"])  # in-place swap must be seen by the captured graph
            res["cudagraph_sees_swap_rel"] = round(rel(one(0), forward(model, inp.hidden, inp, 0)), 6)
            sw.apply(loras["A64"])
            log("cudagraph loop", res["loop_lora_A64_cudagraph"])

        cg()

        if "attn8" in args.phases and left() > 150:
            @phase("fused_attn8")
            def attn8():
                import diffusers.models.transformers.transformer_flux as tf

                from fastlora_core import fp8_attention as kernels

                o_std = forward(model, inp.hidden, inp, 0).clone()
                orig = tf.dispatch_attention_fn

                def fp8_dispatch(query, key, value, attn_mask=None, backend=None, parallel_config=None, **kw):
                    return kernels.fp8_sdpa(query, key, value)

                tf.dispatch_attention_fn = fp8_dispatch
                torch._dynamo.reset()
                t0 = time.perf_counter()
                o8 = forward(model, inp.hidden, inp, 0).clone()
                sync()
                res["attn8_compile_first_forward_s"] = round(time.perf_counter() - t0, 1)
                res["attn8_vs_bf16attn_rel"] = round(rel(o8, o_std), 5)
                res["loop_lora_A64_attn8"] = time_loops(lambda: run_loop(model, inp), args.loops)
                log("attn8 loop", res["loop_lora_A64_attn8"])
                save()
                try:
                    loop, one = cudagraph_loop(model, inp)
                    res["loop_lora_A64_attn8_cudagraph"] = time_loops(loop, args.loops)
                    log("attn8 cudagraph loop", res["loop_lora_A64_attn8_cudagraph"])
                except Exception as exc:  # noqa: BLE001
                    res["attn8_cudagraph_error"] = str(exc)[:500]
                res["profile_attn8"] = profile_step(model, inp, top=15)
                tf.dispatch_attention_fn = orig

            attn8()


# ---------------------------------------------------------------------------------------------------
# group: fp8_adapter (the published recipe)
# ---------------------------------------------------------------------------------------------------
def group_fp8_adapter(args):
    _adapter_group(args, "fp8_adapter", quantize=True)


def group_bf16_adapter(args):
    """The recipe's middle step: bf16, regional compile, PEFT hotswap padded to rank 64."""
    _adapter_group(args, "bf16_adapter", quantize=False)


def _adapter_group(args, name, quantize):
    import torch
    import torch._dynamo

    res = RESULT.setdefault(name, {})
    model = build_transformer()
    inp = Inputs(steps=args.steps)
    names = target_names(model)
    loraA = make_lora(model, names, 64, seed=1)
    loraB = make_lora(model, names, 64, seed=2)
    with torch.inference_mode():
        model.enable_lora_hotswap(target_rank=64)
        model.load_lora_adapter(peft_state_dict(loraA), prefix=None, adapter_name="default_0")
        if quantize:
            quantize_fp8(model)
        res["compile_first_forward_s"] = compile_regional(model, inp)
        torch.cuda.reset_peak_memory_stats()
        res["loop_lora_A64"] = time_loops(lambda: run_loop(model, inp), args.loops)
        log(name, "loop", res["loop_lora_A64"])
        save()

        @phase("adapter_swaps")
        def swaps():
            torch._dynamo.config.error_on_recompile = True
            before = dynamo_counts()
            ts = {}
            for label, lo in (("r64_B", loraB), ("r64_A", loraA), ("r16", make_lora(model, names, 16, seed=16))):
                sd = peft_state_dict(lo)
                sync()
                t0 = time.perf_counter()
                model.load_lora_adapter(sd, prefix=None, adapter_name="default_0", hotswap=True)
                sync()
                ts[label] = round((time.perf_counter() - t0) * 1000, 1)
                forward(model, inp.hidden, inp, 0)
            after = dynamo_counts()
            torch._dynamo.config.error_on_recompile = False
            res["hotswap_ms_from_gpu_state_dict"] = ts
            res["hotswap_new_graphs"] = after["unique_graphs"] - before["unique_graphs"]

        swaps()

        if quantize:
            @phase("adapter_profile")
            def prof():
                res["profile_one_forward"] = profile_step(model, inp, top=20)

            prof()


# ---------------------------------------------------------------------------------------------------
# group: fp8_fqkv (fused QKV projections)
# ---------------------------------------------------------------------------------------------------
def group_fp8_fqkv(args):
    import torch

    res = RESULT.setdefault("fp8_fqkv", {})
    model = build_transformer()
    inp = Inputs(steps=args.steps)
    with torch.inference_mode():
        o_ref = forward(model, inp.hidden, inp, 0).clone()
        model.fuse_qkv_projections()
        o_f = forward(model, inp.hidden, inp, 0).clone()
        res["fused_vs_unfused_bf16_rel"] = round(rel(o_f, o_ref), 5)
        quantize_fp8(model)
        res["compile_first_forward_s"] = compile_regional(model, inp)
        torch.cuda.reset_peak_memory_stats()
        res["loop_nolora"] = time_loops(lambda: run_loop(model, inp), args.loops)
        log("fqkv loop", res["loop_nolora"])
        save()

        @phase("fqkv_cudagraph")
        def cg():
            loop, one = cudagraph_loop(model, inp)
            res["loop_nolora_cudagraph"] = time_loops(loop, args.loops)
            log("fqkv cudagraph", res["loop_nolora_cudagraph"])

        cg()


GROUPS = {"micro": group_micro, "eager": group_eager, "fp8_fused": group_fp8_fused,
          "fp8_adapter": group_fp8_adapter, "bf16_adapter": group_bf16_adapter, "fp8_fqkv": group_fp8_fqkv}


def worker(args):
    global OUT_PATH, DEADLINE
    OUT_PATH = Path(args.out)
    DEADLINE = args.deadline
    RESULT["group"] = args.worker
    RESULT["env"] = env_info()
    save()
    t0 = time.time()
    try:
        if args.worker.startswith("engine"):
            from benchmarks import bench_engine

            args.engine_configs = args.worker.split("_", 1)[1] if "_" in args.worker else "cold"

            bench_engine.run(args, RESULT, save)
        else:
            GROUPS[args.worker](args)
    except Exception as exc:  # noqa: BLE001
        RESULT.setdefault("errors", {})["group"] = f"{type(exc).__name__}: {exc}"[:3000]
        traceback.print_exc()
    RESULT["group_seconds"] = round(time.time() - t0, 1)
    save()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="micro,fp8_fused,eager,fp8_adapter,fp8_fqkv")
    p.add_argument("--out", default=f"benchmarks/results/{_dt.date.today().isoformat()}-bench.json")
    p.add_argument("--budget", type=float, default=540, help="seconds for all groups; later groups are skipped")
    p.add_argument("--min-group", type=float, default=60, help="skip a group when less than this is left")
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--eager-loops", type=int, default=2)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--phases", default="attn8", help="optional phases: attn8")
    p.add_argument("--engine-configs", default="", help="for the engine group (bench_engine.py)")
    p.add_argument("--cold-cache-per-group", action="store_true",
                   help="fresh TORCHINDUCTOR_CACHE_DIR per group (cold compile times)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    t_start = time.time()
    deadline = t_start + args.budget
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = {"command": " ".join(sys.argv), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "groups": {}}
    for g in [c for c in args.configs.split(",") if c]:
        if deadline - time.time() < args.min_group:
            merged["groups"][g] = {"skipped": "time budget"}
            continue
        part = out.with_name(out.stem + f".{g}.json")
        cmd = [sys.executable, __file__, "--worker", g, "--out", str(part), "--deadline", str(deadline - 5)]
        env = dict(os.environ)
        if args.cold_cache_per_group and not g.startswith("engine"):
            env["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/fastlora-bench-inductor-{g}-{int(t_start)}"
        for k in ("loops", "eager_loops", "steps", "phases", "engine_configs"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        log("running", g)
        try:
            rc = subprocess.run(cmd, env=env, timeout=max(10, deadline - time.time())).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        data = json.loads(part.read_text()) if part.exists() else {}
        data["returncode"] = rc
        merged["groups"][g] = data
        out.write_text(json.dumps(merged, indent=1, default=str))
    merged["total_seconds"] = round(time.time() - t_start, 1)
    out.write_text(json.dumps(merged, indent=1, default=str))
    # The human tables, printed and beside the JSON (report.py merges several runs into RESULTS.md).
    if __package__:  # python -m benchmarks.bench_flux
        from . import report
    else:  # python benchmarks/bench_flux.py: this script's folder is on sys.path
        import report

    text = report.render([merged], [out.name])
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
