"""FastLoRA's MODEL against ComfyUI's own UNETLoader, in one process with a real ComfyUI.

Run by tests/test_comfy_model.py as a subprocess (ComfyUI's modules and two full-width tiny models
stay out of the pytest process): ``python tests/comfy_model_check.py COMFYUI_DIR WORK_DIR OUT.json``.

The tiny transformer is full-width (ComfyUI's detection fixes Flux's widths) with one double and
one single block; conditioning is built directly in ComfyUI's CONDITIONING format (ComfyUI's T5-XXL
cannot be made tiny: its width is fixed at 4096 and 24 layers, 19 GB in float32). Both paths sample
the same latents with the same seed through ComfyUI's own KSampler code; every scenario records the
largest absolute difference of the latents relative to the largest absolute value of ComfyUI's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "fastlora_pack"


def load_comfy(comfy_dir: str) -> Any:
    # ComfyUI first (its top-level ``nodes`` module), then this repository for ``fastlora_core``.
    sys.path[:0] = [comfy_dir, str(ROOT)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths

    import nodes as comfy_nodes

    return comfy_nodes, folder_paths


def load_pack() -> Any:
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def write_loras(folder: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Path]:
    """Tiny-model LoRAs in the layouts ComfyUI's loaders map differently: BFL names on fused
    weights (qkv, linear1, final adaLN), diffusers names (row slices of fused weights), plus a DoRA
    and a LoKr file that must be refused, and the first file with one NaN."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)

    def pair(out_f: int, in_f: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(out_f, rank, generator=g) * 0.5 / rank**0.5,
                torch.randn(rank, in_f, generator=g) * 0.5 / in_f**0.5)

    out: dict[str, Path] = {}
    bfl: dict[str, torch.Tensor] = {}
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1",
                 "single_blocks.0.linear2", "final_layer.adaLN_modulation.1", "img_in"):
        o, i = shapes[f"diffusion_model.{name}.weight"][:2]
        up, down = pair(o, i, 4)
        bfl[f"diffusion_model.{name}.lora_up.weight"] = up
        bfl[f"diffusion_model.{name}.lora_down.weight"] = down
        bfl[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    out["a"] = folder / "tiny-bfl.safetensors"
    save_file(bfl, str(out["a"]))
    dif: dict[str, torch.Tensor] = {}
    for name, (o, i) in {"transformer_blocks.0.attn.to_k": (3072, 3072), "transformer_blocks.0.attn.add_v_proj": (3072, 3072),
                         "single_transformer_blocks.0.proj_mlp": (12288, 3072),
                         "single_transformer_blocks.0.attn.to_q": (3072, 3072)}.items():
        up, down = pair(o, i, 8)
        dif[f"transformer.{name}.lora_B.weight"] = up
        dif[f"transformer.{name}.lora_A.weight"] = down
    out["b"] = folder / "tiny-diffusers.safetensors"
    save_file(dif, str(out["b"]))
    up, down = pair(3072, 3072, 4)
    out["dora"] = folder / "tiny-dora.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": up,
               "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": down,
               "diffusion_model.double_blocks.0.img_attn.proj.dora_scale": torch.ones(3072, 1)}, str(out["dora"]))
    up, down = pair(3072, 3072, 4)
    out["dora_in"] = folder / "tiny-dora-in.safetensors"  # norms of the input columns: where ComfyUI's DoRA agrees
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": up,
               "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": down,
               "diffusion_model.double_blocks.0.img_attn.proj.dora_scale": 0.5 + torch.rand(1, 3072, generator=g)},
              str(out["dora_in"]))
    out["lokr"] = folder / "tiny-lokr.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lokr_w1": torch.randn(64, 64, generator=g) * 0.01,
               "diffusion_model.double_blocks.0.img_attn.proj.lokr_w2": torch.randn(48, 48, generator=g) * 0.01},
              str(out["lokr"]))
    out["sdxl"] = folder / "tiny-sdxl.safetensors"  # kohya keys of SDXL's UNet: nothing maps onto Flux
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4, generator=g),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640, generator=g),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)},
              str(out["sdxl"]))
    poisoned = dict(bfl)
    poisoned["diffusion_model.img_in.lora_down.weight"] = poisoned["diffusion_model.img_in.lora_down.weight"].clone()
    poisoned["diffusion_model.img_in.lora_down.weight"][0, 0] = float("nan")
    out["nan"] = folder / "tiny-nan.safetensors"
    save_file(poisoned, str(out["nan"]))
    return out


def main(comfy_dir: str, work: str, out_path: str, compile_mode: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    work_dir = Path(work)
    comfy_nodes, folder_paths = load_comfy(comfy_dir)
    import comfy.sd
    import comfy.utils
    import comfy_api.torch_helpers as torch_helpers

    from fastlora_core.tiny import COMFY_TINY_TRANSFORMER_NAME, write_comfy_tiny_transformer

    models = work_dir / "models"
    unet = models / "diffusion_models" / COMFY_TINY_TRANSFORMER_NAME
    if not unet.exists():
        write_comfy_tiny_transformer(unet)
    folder_paths.add_model_folder_path("diffusion_models", str(unet.parent))
    folder_paths.add_model_folder_path("loras", str(models / "loras"))
    (models / "loras").mkdir(parents=True, exist_ok=True)
    from safetensors import safe_open

    with safe_open(str(unet), "pt") as f:
        shapes = {f"diffusion_model.{k}": tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    loras = write_loras(models / "loras", shapes)
    pack = load_pack()
    flux_nodes = sys.modules[f"{PACK}.nodes.flux_nodes"]
    comfy_model = sys.modules[f"{PACK}.nodes.comfy_model"]
    results: dict[str, Any] = {"scenarios": {}, "refusals": {}, "errors": []}

    g = torch.Generator().manual_seed(0)
    ctx, pooled = torch.randn(1, 8, 4096, generator=g), torch.randn(1, 768, generator=g)
    neg_ctx, neg_pooled = torch.randn(1, 6, 4096, generator=g), torch.randn(1, 768, generator=g)
    positive = [[ctx, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[neg_ctx, {"pooled_output": neg_pooled, "guidance": 3.5}]]
    image_latent = torch.randn(1, 16, 8, 8, generator=g)

    t0 = time.perf_counter()
    native = comfy.sd.load_diffusion_model(str(unet), {"dtype": torch.float32})
    results["native_load_s"] = time.perf_counter() - t0
    loader = flux_nodes.OptimizedFluxLoader()
    t0 = time.perf_counter()
    handle, ours = loader.load("single files", "None", COMFY_TINY_TRANSFORMER_NAME, "None", "None", "None",
                               "none", "none", "auto", compile_mode, "none", "float32", "fused", 128,
                               components=flux_nodes.COMPONENTS_TRANSFORMER)
    results["ours_load_s"] = time.perf_counter() - t0
    engine = comfy_model.EngineDiffusionModel.engine.fget(ours.model.diffusion_model)
    results["engine_modules"] = sorted(k for k in ("text_encoder", "text_encoder_2", "vae")
                                       if getattr(engine.pipe, k) is not None)
    results["model_config"] = [type(native.model.model_config).__name__, type(ours.model.model_config).__name__]
    results["model_sampling_shift"] = [float(native.model.model_sampling.shift), float(ours.model.model_sampling.shift)]
    # the sampler gets the text conditioning already in the model's dtype (cast once, not every step)
    conds = ours.model.extra_conds(cross_attn=ctx.double(), pooled_output=pooled.double(), guidance=3.5,
                                   device=torch.device("cpu"), noise=torch.zeros(1, 16, 8, 8))
    results["encoded_cond_dtypes"] = {k: str(conds[k].cond.dtype) for k in ("c_crossattn", "y", "guidance")}
    results["model_dtype"] = str(ours.model.get_dtype())

    lora_loader = comfy_nodes.LoraLoaderModelOnly()

    def with_loras(model: Any, spec: list[tuple[str, float]]) -> Any:
        for key, strength in spec:
            model = lora_loader.load_lora_model_only(model, loras[key].name, strength)[0]
        return model

    def sample(model: Any, *, steps: int = 3, cfg: float = 1.0, sampler: str = "euler", scheduler: str = "simple",
               latent: dict[str, Any] | None = None, denoise: float = 1.0, seed: int = 11) -> torch.Tensor:
        latent = latent if latent is not None else {"samples": torch.zeros(1, 16, 8, 8)}
        with torch.inference_mode():
            return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                               denoise=denoise)[0]["samples"].clone()

    def custom_advanced(model: Any, steps: int = 3) -> torch.Tensor:
        """SamplerCustomAdvanced with BasicGuider, KSamplerSelect, BasicScheduler and RandomNoise."""
        import comfy_extras.nodes_custom_sampler as cs

        with torch.inference_mode():
            guider = cs.BasicGuider().get_guider(model, positive)[0]
            sigmas = cs.BasicScheduler().get_sigmas(model, "beta", steps, 1.0)[0]
            out = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(5)[0], guider,
                                                    cs.KSamplerSelect().get_sampler("heun")[0], sigmas,
                                                    {"samples": torch.zeros(1, 16, 8, 8)})[0]
            return out["samples"].clone()

    def custom(model: Any, steps: int = 3) -> torch.Tensor:
        """SamplerCustom (noise added, CFG 2 with the negative) with the Karras sigmas of BasicScheduler."""
        import comfy_extras.nodes_custom_sampler as cs

        with torch.inference_mode():
            sigmas = cs.BasicScheduler().get_sigmas(model, "karras", steps, 1.0)[0]
            out = cs.SamplerCustom().sample(model, True, 3, 2.0, positive, negative,
                                            cs.KSamplerSelect().get_sampler("euler_ancestral")[0], sigmas,
                                            {"samples": torch.zeros(1, 16, 8, 8)})[0]
            return out["samples"].clone()

    def advanced(model: Any, steps: int = 4) -> torch.Tensor:
        """KSamplerAdvanced: steps 1..3 of 4 with leftover noise returned (a two-stage graph's first half)."""
        with torch.inference_mode():
            out = comfy_nodes.KSamplerAdvanced().sample(model, "enable", 9, steps, 1.0, "euler", "simple", positive,
                                                        negative, {"samples": torch.zeros(1, 16, 8, 8)}, 1, 3,
                                                        "enable")[0]
            return out["samples"].clone()

    def shifted(model: Any) -> Any:
        import comfy_extras.nodes_model_advanced as ma

        return ma.ModelSamplingFlux().patch(model, 1.3, 0.6, 64, 64)[0]

    def compare(name: str, spec: list[tuple[str, float]], fn: Any = None, wrap: Any = None, **kw: Any) -> torch.Tensor:
        fn = fn or sample
        wrap = wrap or (lambda m: m)
        ref = fn(wrap(with_loras(native, spec)), **kw)
        before = engine.compiles
        t0 = time.perf_counter()
        got = fn(wrap(with_loras(ours, spec)), **kw)
        seconds = time.perf_counter() - t0
        base = float(ref.abs().max())
        results["scenarios"][name] = {
            "rel_max_diff": float((got - ref).abs().max()) / base, "ref_max": base,
            "finite": bool(torch.isfinite(got).all()), "shape": list(got.shape),
            "new_compiles": engine.compiles - before, "seconds": seconds,
            "stack": comfy_model.STATS["last"]["stack"] if comfy_model.STATS["last"] else None,
        }
        return got

    try:
        compare("no_lora", [])
        compare("lora_bfl_1.0", [("a", 1.0)])
        compare("lora_bfl_0.5", [("a", 0.5)])
        compare("lora_bfl_-0.7", [("a", -0.7)])
        compare("lora_diffusers_1.0", [("b", 1.0)])
        compare("stack_two", [("a", 0.8), ("b", -0.6)])
        compare("img2img_0.6", [("a", 1.0)], latent={"samples": image_latent.clone()}, denoise=0.6)
        compare("cfg_3_negative", [("b", 1.0)], cfg=3.0)
        compare("dpmpp_2m_karras", [], sampler="dpmpp_2m", scheduler="karras", steps=4)
        compare("batch_2", [("a", 0.7)], latent={"samples": torch.zeros(2, 16, 8, 8)})
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 2:6] = 1.0
        compare("noise_mask", [("a", 1.0)], latent={"samples": image_latent.clone(), "noise_mask": mask}, denoise=0.8)
        compare("size_80x48", [("b", 0.5)], latent={"samples": torch.zeros(1, 16, 6, 10)})
        compare("sampler_custom_advanced", [("a", 1.0)], fn=custom_advanced)
        compare("sampler_custom", [("b", 0.8)], fn=custom)
        compare("ksampler_advanced", [("a", 1.0)], fn=advanced)
        compare("model_sampling_flux", [("b", 1.0)], wrap=shifted)

        # A -> B -> A on our MODEL, bit for bit, without compiling again
        a1 = sample(with_loras(ours, [("a", 1.0)]))
        c0 = engine.compiles
        b = sample(with_loras(ours, [("b", 1.0)]))
        a_half = sample(with_loras(ours, [("a", 0.5)]))
        a2 = sample(with_loras(ours, [("a", 1.0)]))
        results["aba"] = {"identical": bool(torch.equal(a1, a2)), "b_differs": not torch.equal(a1, b),
                          "half_differs": not torch.equal(a1, a_half), "compiles_during": engine.compiles - c0,
                          "compiles_total": engine.compiles,
                          # blocks loaded as saved by an earlier process count as compiled (decision 40)
                          "blocks_loaded": engine.precompiled.stats.loaded if engine.precompiled else 0}

        def refused(name: str, fn: Any) -> None:
            try:
                fn()
                results["refusals"][name] = None
            except Exception as exc:  # noqa: BLE001 - record the message
                results["refusals"][name] = f"{type(exc).__name__}: {exc}"

        def controlnet() -> None:  # what Apply ControlNet attaches to the conditioning
            import comfy.controlnet

            with torch.inference_mode():
                comfy_nodes.common_ksampler(ours, 1, 2, 1.0, "euler", "simple",
                                            [[ctx, {"pooled_output": pooled, "control": comfy.controlnet.ControlBase()}]],
                                            negative, {"samples": torch.zeros(1, 16, 8, 8)})

        def block_patch() -> None:
            m = ours.clone()
            m.set_model_double_block_patch(lambda args: args)
            sample(m, steps=1)

        def torch_compile() -> None:
            m = ours.clone()
            torch_helpers.set_torch_compile_wrapper(m, backend="inductor")
            sample(m, steps=1)

        def model_merge() -> None:
            comfy_nodes.ModelMergeSimple().merge(ours, native, 0.5) if hasattr(comfy_nodes, "ModelMergeSimple") else \
                __import__("comfy_extras.nodes_model_merging", fromlist=["x"]).ModelMergeSimple().merge(ours, native, 0.5)

        # LoraLoader passes the same patch dict to the MODEL and the CLIP: CLIP keys are not ours to refuse
        import comfy.weight_adapter

        clip_only = ours.clone()
        up, down = torch.randn(768, 2, generator=g), torch.randn(2, 768, generator=g)
        clip_key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        clip_only.add_patches({clip_key: comfy.weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))})
        results["clip_keys_ignored"] = [len(gr.deltas) for gr in clip_only.fastlora_groups] == [0] and \
            bool(torch.equal(sample(clip_only), sample(ours)))

        refused("controlnet", controlnet)
        refused("block_patch", block_patch)
        refused("torch_compile", torch_compile)
        refused("dora", lambda: lora_loader.load_lora_model_only(ours, loras["dora"].name, 1.0))
        refused("lokr", lambda: lora_loader.load_lora_model_only(ours, loras["lokr"].name, 1.0))
        refused("model_merge", model_merge)
        refused("other_family", lambda: lora_loader.load_lora_model_only(ours, loras["sdxl"].name, 1.0))
        refused("nan_lora", lambda: sample(with_loras(ours, [("nan", 1.0)]), steps=1))
        after = sample(with_loras(ours, [("a", 1.0)]))
        results["usable_after_refusals"] = bool(torch.equal(after, a1))

        # FastLoRA's own LoRA node for MODEL: the same latents as ComfyUI's loader on UNETLoader's model for
        # the same files, mixed with ComfyUI's loader, and the LyCORIS / DoRA files ComfyUI's patches cannot
        # bring to this MODEL
        hotswap = flux_nodes.LoraHotswapModel()

        def with_files(model: Any, spec: list[tuple[str, float]]) -> Any:
            for key, strength in spec:
                model = hotswap.apply(model, loras[key].name, strength)[0]
            return model

        results["hotswap_model"] = {}
        for name, native_spec, build in (
                ("bfl_0.5", [("a", 0.5)], lambda: with_files(ours, [("a", 0.5)])),
                ("mixed_with_comfyui_loader", [("a", 0.8), ("b", -0.6)],
                 lambda: with_files(with_loras(ours, [("a", 0.8)]), [("b", -0.6)])),
                ("lokr", [("lokr", 1.0)], lambda: with_files(ours, [("lokr", 1.0)])),
                ("dora", [("dora_in", 0.7)], lambda: with_files(ours, [("dora_in", 0.7)]))):
            ref = sample(with_loras(native, native_spec))
            before = engine.compiles
            got = sample(build())
            stack, new_compiles = comfy_model.STATS["last"]["stack"], engine.compiles - before
            base = float(ref.abs().max())
            results["hotswap_model"][name] = {
                "rel_max_diff": float((got - ref).abs().max()) / base, "finite": bool(torch.isfinite(got).all()),
                "differs_from_no_lora": not torch.equal(got, sample(ours)), "new_compiles": new_compiles,
                "stack": stack}
        refused("hotswap_model_nan", lambda: with_files(ours, [("nan", 1.0)]))
        refused("hotswap_model_on_unetloader_model", lambda: with_files(native, [("a", 1.0)]))
        results["usable_after_hotswap_refusals"] = bool(torch.equal(sample(with_loras(ours, [("a", 1.0)])), a1))
        results["engine_compiles"] = engine.compiles

        # Cancel: ComfyUI's progress hook raises InterruptProcessingException after the first step
        import comfy.model_management as mm

        def interrupt(value: int, total: int, preview: Any, prompt_id: Any = None, node_id: Any = None) -> None:
            if value >= 1:
                raise mm.InterruptProcessingException()

        comfy.utils.set_progress_bar_global_hook(interrupt)
        try:
            sample(with_loras(ours, [("b", 1.0)]))
            cancelled = False
        except mm.InterruptProcessingException:
            cancelled = True
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        results["cancel"] = {"cancelled": cancelled,
                             "next_run_same": bool(torch.equal(sample(with_loras(ours, [("a", 1.0)])), a1))}

        # "Unload models" (POST /free): ComfyUI unloads every model; the next sampling rebuilds the engine
        mm.unload_all_models()
        released = engine.released
        again = sample(with_loras(ours, [("a", 1.0)]))
        rebuilt = comfy_model.EngineDiffusionModel.engine.fget(ours.model.diffusion_model)
        results["free"] = {"released": released, "rebuilt": rebuilt is not engine and not rebuilt.released,
                           "same_image": bool(torch.equal(again, a1))}
        del handle, pack
    except Exception:  # noqa: BLE001 - report to the test
        results["errors"].append(traceback.format_exc())
    Path(out_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "off")
