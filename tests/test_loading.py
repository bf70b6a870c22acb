"""Loading layer: diffusers folders and ComfyUI single files -> FluxPipeline (fastlora_core.loading).

Every source is written from one tiny random pipeline; each load must give back the same weights
bit for bit (``torch.equal``; the fp8 T5 / fp8 transformer sources are compared with the original
weights rounded through fp8 the same way, again exactly) and the same image within ``IMAGE_TOL``.

Why images get a tolerance: weights loaded from a safetensors file keep the file's data offsets,
so they are not 64-byte aligned like freshly allocated tensors, and x86-64 CPU GEMM kernels take
other code paths (other summation orders) for other alignments. On AMD EPYC the same weights give
images differing by ~3e-7 (measured; copying the loaded weights into fresh tensors makes them
equal again). A wrong weight would change the image by far more than IMAGE_TOL, and the weights
themselves are compared exactly. Key mappings are cross-checked against diffusers' own converters
at real Flux widths.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastlora_core import loading
from fastlora_core.errors import ModelLoadError, OptionsError
from fastlora_core.loading import (
    keymaps,
    load_pipeline,
    read_header,
    single_file,
    tokenizers,
    write_single_files,
    writer,
)
from fastlora_core.specs import ModelSource
from fastlora_core.tiny import build_tiny_pipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
#: Images of pipelines with equal weights in other memory layouts (0..1 scale); see the module doc.
IMAGE_TOL = 1e-5


def assert_same_image(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = float((a - b).abs().max())
    assert diff <= IMAGE_TOL, f"images differ by {diff:.3g} (tolerance {IMAGE_TOL})"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> Any:
    pipe = build_tiny_pipeline(0, torch.float32)
    for name in COMPONENTS:  # build_tiny_pipeline leaves modules in training mode (T5 dropout!)
        getattr(pipe, name).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loading")


@pytest.fixture(scope="module")
def diffusers_dir(tiny: Any, root: Path) -> Path:
    d = root / "diffusers"
    tiny.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def bfl(tiny: Any, root: Path) -> dict[str, Path]:
    return write_single_files(tiny, root / "bfl", "bfl")


def _files(tiny: Any, root: Path, name: str, **kw: Any) -> dict[str, Path]:
    return write_single_files(tiny, root / name, **kw)


def generate(pipe: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=16,
    ).images


@pytest.fixture(scope="module")
def reference_image(tiny: Any) -> torch.Tensor:
    return generate(tiny)


def assert_same_weights(a: Any, b: Any, expect: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    for name in COMPONENTS:
        sa = (expect or {}).get(name) or getattr(a, name).state_dict()
        sb = getattr(b, name).state_dict()
        assert sorted(sa) == sorted(sb), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, (name, k, sa[k].dtype, sb[k].dtype)
            assert torch.equal(sa[k], sb[k]), (name, k)


def assert_inference_ready(pipe: Any) -> None:
    for name in COMPONENTS:
        m = getattr(pipe, name)
        assert not m.training, name
        assert all(not p.requires_grad and p.device.type == "cpu" and not p.is_meta for p in m.parameters()), name


# ------------------------------------------------------------------------------------- the 3e-4 issue


def test_tiny_pipeline_is_deterministic_only_in_eval_mode(tiny: Any) -> None:
    """The ~3e-4 difference between a tiny pipeline and its save_pretrained/from_pretrained copy is
    T5 dropout (dropout_rate=0.1): build_tiny_pipeline returns modules in training mode, while
    from_pretrained returns them in eval mode. The weights, configs and tokenizers all round-trip."""
    assert build_tiny_pipeline.__module__ and tiny.text_encoder_2.config.dropout_rate > 0
    tiny.text_encoder_2.train()
    try:
        assert not torch.equal(generate(tiny), generate(tiny))  # same pipeline twice: dropout differs
    finally:
        tiny.text_encoder_2.eval()
    assert torch.equal(generate(tiny), generate(tiny))


# --------------------------------------------------------------------------------------- good sources


def test_diffusers_folder_matches_original_exactly(tiny: Any, diffusers_dir: Path, reference_image: torch.Tensor) -> None:
    pipe = load_pipeline(ModelSource.from_diffusers(diffusers_dir), torch.float32)
    assert_inference_ready(pipe)
    assert_same_weights(tiny, pipe)
    assert_same_image(generate(pipe), reference_image)


@pytest.mark.parametrize(
    "variant, kw",
    [
        ("bfl", {"transformer_layout": "bfl"}),
        ("bfl-prefixed", {"transformer_layout": "bfl", "transformer_prefix": "model.diffusion_model."}),
        ("diffusers-layout", {"transformer_layout": "diffusers"}),
    ],
)
def test_single_files_match_original_exactly(
    tiny: Any, root: Path, reference_image: torch.Tensor, variant: str, kw: dict[str, Any]
) -> None:
    files = _files(tiny, root, variant, **kw)
    pipe = load_pipeline(ModelSource.from_single_files(**files), torch.float32)
    assert_inference_ready(pipe)
    assert_same_weights(tiny, pipe)
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.transformer.config) == public(tiny.transformer.config)
    assert pipe.vae.config.scaling_factor == tiny.vae.config.scaling_factor
    assert pipe.vae.config.shift_factor == tiny.vae.config.shift_factor
    assert dict(pipe.scheduler.config)["shift"] == tiny.scheduler.config.shift
    assert_same_image(generate(pipe), reference_image)


def test_written_files_use_comfyui_key_layouts(bfl: dict[str, Path]) -> None:
    keys = {role: set(read_header(bfl[role]).tensors) for role in ("transformer", "clip_l", "t5xxl", "vae")}
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight"} <= keys["transformer"]
    assert all(k.startswith("text_model.") for k in keys["clip_l"])
    assert "shared.weight" in keys["t5xxl"] and all(k.startswith("encoder.") or k == "shared.weight" for k in keys["t5xxl"])
    assert {"encoder.down.0.block.0.norm1.weight", "decoder.up.0.block.0.conv1.weight", "encoder.mid.attn_1.q.weight",
            "encoder.norm_out.weight", "decoder.conv_out.weight"} <= keys["vae"]
    assert read_header(bfl["vae"]).shape("encoder.mid.attn_1.q.weight")[-2:] == (1, 1)
    assert (bfl["tokenizer_dir"] / "clip").is_dir() and (bfl["tokenizer_dir"] / "t5").is_dir()


def test_fp8_t5_and_scaled_fp8_transformer(tiny: Any, root: Path) -> None:
    files = _files(tiny, root, "fp8", transformer_layout="bfl", t5_dtype=torch.float8_e4m3fn,
                   transformer_dtype=torch.float8_e4m3fn, scaled_fp8=True)
    assert files["t5xxl"].name == "t5xxl_fp8_e4m3fn.safetensors"
    h = read_header(files["transformer"])
    assert "scaled_fp8" in h.tensors and "double_blocks.0.img_attn.qkv.scale_weight" in h.tensors
    t5_header = read_header(files["t5xxl"]).tensors
    # as ComfyUI's t5xxl_fp8_e4m3fn file: the norms are fp8 too (ComfyUI takes the T5's dtype from them)
    assert {t5_header[k].dtype for k in ("encoder.block.0.layer.0.SelfAttention.q.weight",
                                         "encoder.final_layer_norm.weight")} == {"F8_E4M3"}
    pipe = load_pipeline(ModelSource.from_single_files(**files), torch.float32)

    # Expected weights: the same fp8 rounding applied to the original, then upcast (exact).
    t5_expect = {k: v.to(torch.float8_e4m3fn).float() for k, v in tiny.text_encoder_2.state_dict().items()}
    raw = load_file(str(files["transformer"]))
    deq = {k: (v.float() * raw[k[: -len("weight")] + "scale_weight"] if k[: -len("weight")] + "scale_weight" in raw else v)
           for k, v in raw.items() if not k.endswith("scale_weight") and k != "scaled_fp8"}
    tr_expect, unknown = keymaps._bfl_to_diffusers(deq, 32)  # mapping checked against diffusers below
    assert not unknown
    assert_same_weights(tiny, pipe, {"text_encoder_2": t5_expect, "transformer": tr_expect})
    for name, w in tiny.transformer.state_dict().items():  # e4m3 keeps ~3 mantissa bits
        assert torch.allclose(tr_expect[name], w, rtol=0.07, atol=float(w.abs().max()) * 2**-8), name

    ref = copy.deepcopy(tiny)  # the original pipeline holding the same rounded weights: same image
    ref.transformer.load_state_dict(tr_expect)
    ref.text_encoder_2.load_state_dict(t5_expect)
    assert_same_image(generate(pipe), generate(ref))


def test_plain_fp8_transformer_upcasts(tiny: Any, root: Path) -> None:
    files = _files(tiny, root, "fp8plain", transformer_layout="diffusers", transformer_dtype=torch.float8_e4m3fn)
    pipe = load_pipeline(ModelSource.from_single_files(**files), torch.bfloat16)
    for k, w in tiny.transformer.state_dict().items():
        want = (w.to(torch.float8_e4m3fn) if w.dim() >= 2 else w).to(torch.bfloat16)
        assert torch.equal(pipe.transformer.state_dict()[k], want), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_load_paths_agree_in_half_precision(diffusers_dir: Path, bfl: dict[str, Path], dtype: torch.dtype) -> None:
    """Same dtypes everywhere, T5's ``wo`` kept in float32 at fp16 like from_pretrained does."""
    a = load_pipeline(ModelSource.from_diffusers(diffusers_dir), dtype)
    b = load_pipeline(ModelSource.from_single_files(**bfl), dtype)
    assert_same_weights(a, b)
    wo = b.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == (torch.float32 if dtype == torch.float16 else dtype)
    assert b.text_encoder_2.shared.weight is b.text_encoder_2.encoder.embed_tokens.weight
    assert_same_image(generate(a), generate(b))


def test_comfyui_tokenizer_layout(tiny: Any, bfl: dict[str, Path], root: Path) -> None:
    """tokenizer_dir may be a ComfyUI checkout (comfy/sd1_tokenizer + comfy/text_encoders/t5_tokenizer)
    or a diffusers folder (tokenizer/ + tokenizer_2/)."""
    comfy = root / "ComfyUI"
    shutil.copytree(bfl["tokenizer_dir"] / "clip", comfy / "comfy" / "sd1_tokenizer")
    shutil.copytree(bfl["tokenizer_dir"] / "t5", comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    for tok_dir in (comfy, comfy / "comfy"):
        assert loading.find_tokenizer_dirs(tok_dir)[0] == comfy / "comfy" / "sd1_tokenizer"
    files = dict(bfl, tokenizer_dir=comfy)
    pipe = load_pipeline(ModelSource.from_single_files(**files), torch.float32)
    assert pipe.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
    assert pipe.tokenizer.model_max_length == 77


def test_tokenizers_found_from_running_comfyui(bfl: dict[str, Path], root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokenizer_dir=None inside ComfyUI: its root is found from the already imported folder_paths."""
    import types

    comfy = root / "ComfyUI-running"
    shutil.copytree(bfl["tokenizer_dir"] / "clip", comfy / "comfy" / "sd1_tokenizer")
    shutil.copytree(bfl["tokenizer_dir"] / "t5", comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    fake = types.ModuleType("folder_paths")
    fake.__file__ = str(comfy / "folder_paths.py")
    monkeypatch.setitem(__import__("sys").modules, "folder_paths", fake)
    assert loading.find_tokenizer_dirs(None) == (comfy / "comfy" / "sd1_tokenizer",
                                                 comfy / "comfy" / "text_encoders" / "t5_tokenizer")


def test_real_comfyui_tokenizers_when_available() -> None:
    root = __import__("os").environ.get("COMFYUI_DIR", "")
    comfy = Path(root)
    if not root or not (comfy / "comfy" / "sd1_tokenizer").is_dir():
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run this")
    clip_d, t5_d = loading.find_tokenizer_dirs(comfy)
    clip, t5 = tokenizers._load_tokenizers(clip_d, t5_d, 77)
    assert clip.model_max_length == 77  # ComfyUI's file says 8192
    assert clip("a photo of a cat").input_ids[0] == 49406 and len(t5) >= 32100


# ------------------------------------------------------------- mappings vs diffusers' own converters

INNER = 3072  # diffusers' converter hard-codes Flux.1's width


def _synthetic_bfl() -> dict[str, torch.Tensor]:
    rows = {
        "time_in.in_layer": INNER, "time_in.out_layer": INNER, "vector_in.in_layer": INNER,
        "vector_in.out_layer": INNER, "guidance_in.in_layer": INNER, "guidance_in.out_layer": INNER,
        "txt_in": INNER, "img_in": INNER, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * INNER,
    }
    for i in range(2):
        b = f"double_blocks.{i}."
        rows.update({b + "img_mod.lin": 6 * INNER, b + "txt_mod.lin": 6 * INNER, b + "img_attn.qkv": 3 * INNER,
                     b + "txt_attn.qkv": 3 * INNER, b + "img_attn.proj": INNER, b + "txt_attn.proj": INNER,
                     b + "img_mlp.0": 4 * INNER, b + "img_mlp.2": INNER, b + "txt_mlp.0": 4 * INNER,
                     b + "txt_mlp.2": INNER})
        s = f"single_blocks.{i}."
        rows.update({s + "modulation.lin": 3 * INNER, s + "linear1": 7 * INNER, s + "linear2": INNER})
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for name, n in rows.items():
        sd[name + ".weight"] = torch.randn(n, 2, generator=g)
        sd[name + ".bias"] = torch.randn(n, generator=g)
    for i in range(2):
        for n in ("img_attn", "txt_attn"):
            for qk in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{n}.norm.{qk}.scale"] = torch.randn(128, generator=g)
        for qk in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{qk}.scale"] = torch.randn(128, generator=g)
    return sd


def test_bfl_mapping_matches_diffusers_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = _synthetic_bfl()
    work = dict(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(work)
    assert not work, f"synthetic BFL keys diffusers did not consume: {sorted(work)[:5]}"  # real key names
    ours, unknown = keymaps._bfl_to_diffusers(dict(bfl), INNER)
    assert not unknown and sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = writer._diffusers_to_bfl(theirs, 2, 2)  # the writer inverts diffusers' own conversion
    assert sorted(back) == sorted(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)


def test_vae_mapping_matches_diffusers_converter() -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(4, 8, 8), layers_per_block=2, latent_channels=4, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    sd = vae.state_dict()
    ldm = writer._diffusers_to_ldm_vae(sd, 3)
    assert "decoder.up.2.upsample.conv.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in ldm and "encoder.down.1.block.0.nin_shortcut.weight" in ldm
    theirs = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    ours, unknown = keymaps._ldm_vae_to_diffusers(dict(ldm), 3)
    assert not unknown
    for conv in (theirs, ours):
        assert sorted(conv) == sorted(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)


def test_shipped_configs_build_real_sized_modules_on_meta() -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    tr = single_file._empty_module(lambda: FluxTransformer2DModel(**{
        k: v for k, v in loading.load_shipped_config("flux1_dev_transformer").items() if not k.startswith("_")}))
    assert sum(p.numel() for p in tr.parameters()) == 11_901_408_320  # FLUX.1-dev
    vae = single_file._empty_module(lambda: AutoencoderKL(**{
        k: v for k, v in loading.load_shipped_config("ae").items() if not k.startswith("_")}))
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683
    assert CLIPTextConfig(**loading.load_shipped_config("clip_l")).hidden_size == 768
    assert T5Config(**loading.load_shipped_config("t5xxl")).is_gated_act


# -------------------------------------------------------------------------------------- bad sources


def _rewrite(src: Path, dst: Path, edit: Any = None, metadata: dict[str, str] | None = None) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(str(src))
    if edit is not None:
        sd = edit(sd)
    save_file(sd, str(dst), metadata=meta if metadata is None else metadata)
    return dst


def _bad_sources(tiny: Any, bfl: dict[str, Path], diffusers_dir: Path, bad: Path) -> dict[str, tuple[ModelSource, list[str]]]:
    bad.mkdir(exist_ok=True)
    singles = {k: v for k, v in bfl.items()}

    def single(**over: Any) -> ModelSource:
        return ModelSource.from_single_files(**(singles | over))

    t = bfl["transformer"]
    data = t.read_bytes()
    (bad / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    (bad / "trailing.safetensors").write_bytes(data + b"\0" * 16)
    (bad / "random.safetensors").write_bytes(bytes(range(256)) * 8)
    (bad / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    torch.save({"state_dict": {"x": torch.zeros(1)}}, bad / "model.ckpt")
    (bad / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    def z() -> torch.Tensor:
        return torch.zeros(2, 2)

    save_file({"model.diffusion_model.input_blocks.0.0.weight": z(), "model.diffusion_model.output_blocks.0.0.weight": z(),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z()}, str(bad / "sdxl.safetensors"))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": z()}, str(bad / "sd3.safetensors"))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": z()}, str(bad / "lora.safetensors"))
    _rewrite(t, bad / "nf4.safetensors", lambda sd: sd | {
        "double_blocks.0.img_attn.qkv.weight.absmax": torch.zeros(4),
        "double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4": torch.zeros(4, dtype=torch.uint8)})
    _rewrite(t, bad / "fill.safetensors", lambda sd: sd | {"img_in.weight": torch.zeros(32, 384)})
    _rewrite(t, bad / "incomplete.safetensors", lambda sd: {k: v for k, v in sd.items() if k != "double_blocks.0.txt_mlp.2.bias"})
    _rewrite(t, bad / "norope.safetensors", metadata={})
    _rewrite(t, bad / "extra.safetensors", lambda sd: sd | {"double_blocks.0.img_attn.lora.weight": z()})
    _rewrite(bfl["vae"], bad / "sdvae.safetensors", metadata={})
    _rewrite(bfl["clip_l"], bad / "clip_wide.safetensors",
             lambda sd: {k: (torch.zeros(*v.shape[:-1], 64) if k.endswith("token_embedding.weight") else v) for k, v in sd.items()})
    (bad / "tok_only_clip" / "clip").mkdir(parents=True, exist_ok=True)
    shutil.copytree(bfl["tokenizer_dir"] / "clip", bad / "tok_only_clip" / "clip", dirs_exist_ok=True)

    no_index = bad / "no_index"
    shutil.copytree(diffusers_dir, no_index, dirs_exist_ok=True)
    (no_index / "model_index.json").unlink()
    fill = bad / "fill_pipe"
    shutil.copytree(diffusers_dir, fill, dirs_exist_ok=True)
    idx = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps(idx | {"_class_name": "FluxFillPipeline"}))
    sdxl_pipe = bad / "sdxl_pipe"
    sdxl_pipe.mkdir(exist_ok=True)
    (sdxl_pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    broken = bad / "broken_pipe"
    shutil.copytree(diffusers_dir, broken, dirs_exist_ok=True)
    w = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])

    return {
        "missing file": (single(transformer=bad / "nope.safetensors"), ["does not exist", "nope.safetensors"]),
        "missing folder": (ModelSource.from_diffusers(bad / "nowhere"), ["does not exist", "nowhere"]),
        "no model_index": (ModelSource.from_diffusers(no_index), ["no model_index.json", "no_index"]),
        "flux fill pipeline": (ModelSource.from_diffusers(fill), ["Fill", "text-to-image"]),
        "sdxl pipeline": (ModelSource.from_diffusers(sdxl_pipe), ["StableDiffusionXLPipeline", "not Flux"]),
        "truncated component": (ModelSource.from_diffusers(broken), ["truncated", "diffusion_pytorch_model"]),
        "truncated": (single(transformer=bad / "trunc.safetensors"), ["truncated", "trunc.safetensors", "download it again"]),
        "trailing bytes": (single(transformer=bad / "trailing.safetensors"), ["corrupt", "trailing.safetensors"]),
        "random bytes": (single(clip_l=bad / "random.safetensors"), ["not a valid .safetensors", "clip_l"]),
        "huge header": (single(vae=bad / "hugeheader.safetensors"), ["not a valid .safetensors", "vae"]),
        "gguf": (single(transformer=bad / "model.gguf"), ["GGUF", "original weights"]),
        "pickle": (single(transformer=bad / "model.ckpt"), ["pickle", "model.ckpt", ".safetensors release"]),
        "sdxl checkpoint": (single(transformer=bad / "sdxl.safetensors"), ["SDXL", "not a Flux.1 transformer"]),
        "sd3 checkpoint": (single(transformer=bad / "sd3.safetensors"), ["Stable Diffusion 3", "sd3.safetensors"]),
        "lora as model": (single(transformer=bad / "lora.safetensors"), ["LoRA"]),
        "nf4": (single(transformer=bad / "nf4.safetensors"), ["quantised", "original bf16"]),
        "flux fill file": (single(transformer=bad / "fill.safetensors"), ["Fill", "384"]),
        "incomplete": (single(transformer=bad / "incomplete.safetensors"), ["1 tensor(s) missing", "ff_context.net.2.bias", "complete file"]),
        "unknown tensors": (single(transformer=bad / "extra.safetensors"), ["does not use", "img_attn.lora"]),
        "no rope metadata": (single(transformer=bad / "norope.safetensors"), ["head size 16", "fastlora.axes_dims_rope"]),
        "clip is t5": (single(clip_l=bfl["t5xxl"]), ["T5", "swap"]),
        "t5 is clip": (single(t5xxl=bfl["clip_l"]), ["CLIP", "swap"]),
        "vae is transformer": (single(vae=bfl["transformer"]), ["Flux transformer", "not an autoencoder"]),
        "sd vae": (single(vae=bad / "sdvae.safetensors"), ["SD1.x/SDXL VAE", "4 latent channels", "ae.safetensors"]),
        "clip too wide": (single(clip_l=bad / "clip_wide.safetensors"), ["hidden size 64", "clip_l.safetensors"]),
        "no tokenizer folder": (single(tokenizer_dir=bad / "no_tokenizers"), ["does not exist", "tokenizer_dir"]),
        "tokenizer folder empty": (single(tokenizer_dir=bad), ["No tokenizers found", "comfy/sd1_tokenizer"]),
        "t5 tokenizer missing": (single(tokenizer_dir=bad / "tok_only_clip"), ["No T5 tokenizer", "t5"]),
    }


@pytest.fixture(scope="module")
def bad_sources(tiny: Any, bfl: dict[str, Path], diffusers_dir: Path, root: Path) -> dict[str, tuple[ModelSource, list[str]]]:
    return _bad_sources(tiny, bfl, diffusers_dir, root / "bad")


BAD_CASES = [
    "missing file", "missing folder", "no model_index", "flux fill pipeline", "sdxl pipeline", "truncated component",
    "truncated", "trailing bytes", "random bytes", "huge header", "gguf", "pickle", "sdxl checkpoint",
    "sd3 checkpoint", "lora as model", "nf4", "flux fill file", "incomplete", "unknown tensors", "no rope metadata",
    "clip is t5", "t5 is clip", "vae is transformer", "sd vae", "clip too wide", "no tokenizer folder",
    "tokenizer folder empty", "t5 tokenizer missing",
]  # an incomplete source cannot be made at all (ModelSource is valid by construction, test_engine)


@pytest.mark.parametrize("own_modules", [False, True], ids=["diffusers-classes", "own-modules"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_raises_model_load_error(bad_sources: dict[str, tuple[ModelSource, list[str]]], case: str,
                                            own_modules: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    source, words = bad_sources[case]
    built: list[str] = []
    real = single_file._build
    monkeypatch.setattr(single_file, "_build", lambda plan, dtype, dry_run, **kw: (
        built.append(plan.role) if not dry_run else None, real(plan, dtype, dry_run, **kw))[1])
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(source, torch.float32, own_modules=own_modules)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert built == [], f"weights were read before the error: {built}"  # validate before building


def test_no_tokenizer_anywhere(bfl: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizers, "_comfyui_root", lambda: None)
    source = ModelSource.from_single_files(**{k: v for k, v in bfl.items() if k != "tokenizer_dir"})
    with pytest.raises(ModelLoadError, match="No tokenizers.*tokenizer_dir"):
        load_pipeline(source, torch.float32)


def test_bad_dtype(bfl: dict[str, Path]) -> None:
    with pytest.raises(OptionsError, match="bfloat16"):
        load_pipeline(ModelSource.from_single_files(**bfl), torch.float64)


def test_good_source_loads_after_failures(tiny: Any, bfl: dict[str, Path], diffusers_dir: Path,
                                         bad_sources: dict[str, tuple[ModelSource, list[str]]],
                                         reference_image: torch.Tensor) -> None:
    for case in ("truncated", "nf4", "clip is t5", "no model_index"):
        with pytest.raises(ModelLoadError):
            load_pipeline(bad_sources[case][0], torch.float32)
    for source in (ModelSource.from_single_files(**bfl), ModelSource.from_diffusers(diffusers_dir)):
        pipe = load_pipeline(source, torch.float32)
        assert_same_weights(tiny, pipe)
        assert_same_image(generate(pipe), reference_image)


def test_comfy_tiny_transformer_is_written_in_bfl_layout(tmp_path: Path) -> None:
    """write-tiny's ComfyUI transformer goes through the writer's BFL mapping (loading.writer)."""
    from fastlora_core.tiny import write_comfy_tiny_transformer

    path = write_comfy_tiny_transformer(tmp_path / "tiny-comfy.safetensors")
    assert "double_blocks.0.img_attn.qkv.weight" in read_header(path).tensors


@pytest.mark.parametrize(("version", "keyword"), [("0.35.2", "torch_dtype"), ("0.41.0", "torch_dtype"),
                                                  ("0.42.1", "dtype"), ("0.43.0.dev0", "dtype"), ("1.0.0", "dtype")])
def test_from_pretrained_dtype_keyword_follows_the_diffusers_version(monkeypatch: pytest.MonkeyPatch, version: str,
                                                                      keyword: str) -> None:
    """diffusers 0.42 renamed ``torch_dtype=`` to ``dtype=`` (the old name warns); older releases only
    know ``torch_dtype=``. Chosen from the version number, not by reading diffusers' source."""
    import diffusers

    from fastlora_core.loading.diffusers_folder import _dtype_kwarg

    monkeypatch.setattr(diffusers, "__version__", version)
    assert _dtype_kwarg(torch.float32) == {keyword: torch.float32}
