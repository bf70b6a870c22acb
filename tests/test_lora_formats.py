"""LoRA file formats -> NormalizedLora, verified by per-layer weight deltas (docs/ARCHITECTURE.md, decision 9).

One reference LoRA (every Linear of a tiny 2+2-block Flux transformer, CLIP and T5 layers, varied
ranks and alphas) is written in every layout by ``tests/lora_keymaps.py`` (an independent key
mapping) and read back with ``read_lora``; ``scale * up @ down`` must match the reference for every
layer, and the set of layers must be the same.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lora_keymaps as km  # tests/ helper (pytest puts tests/ on sys.path)
import pytest
import torch
from safetensors.torch import save_file

from fastlora_core.errors import LoraFitError, LoraFormatError
from fastlora_core.lora.fit import flux_lora_targets, validate_against
from fastlora_core.lora.formats import read_lora
from fastlora_core.lora.types import NormalizedLora
from fastlora_core.tiny import TINY_TRANSFORMER_CONFIG

ATOL = 1e-6
CONFIG_2X2 = dict(TINY_TRANSFORMER_CONFIG, num_layers=2, num_single_layers=2)
# another width (hidden 24, mlp 96) and head layout: split sizes must come from the tensors
CONFIG_WIDE = dict(TINY_TRANSFORMER_CONFIG, num_layers=1, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=3, axes_dims_rope=[2, 2, 4])
CLIP_SHAPES = {
    "text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
    "text_model.encoder.layers.1.self_attn.out_proj": (32, 32),
    "text_model.encoder.layers.1.mlp.fc1": (64, 32),
}
T5_SHAPES = {
    "encoder.block.0.layer.0.SelfAttention.q": (32, 32),
    "encoder.block.1.layer.1.DenseReluDense.wi_0": (64, 32),
}


def _transformer(config: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**config).eval()


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    return _transformer(CONFIG_2X2)


@pytest.fixture(scope="module")
def ref(transformer: torch.nn.Module) -> km.RefLora:
    return km.make_reference(transformer, seed=0, clip_shapes=CLIP_SHAPES, t5_shapes=T5_SHAPES)


def _save(tmp_path: Path, name: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return path


def _assert_deltas(got: dict, want: dict[str, km.RefLayer], only: set[str] | None = None) -> None:
    names = set(want) if only is None else only
    assert set(got) == names, f"missing {sorted(names - set(got))}, extra {sorted(set(got) - names)}"
    for name in sorted(names):
        layer = got[name]
        assert layer.down.dtype == torch.float32 and layer.up.dtype == torch.float32, name
        assert layer.down.device.type == "cpu", name
        torch.testing.assert_close(layer.delta(), want[name].delta(), atol=ATOL, rtol=0, msg=name)


def _assert_all(lora: NormalizedLora, ref: km.RefLora, text_encoders: bool = True) -> None:
    _assert_deltas(lora.transformer, ref.transformer)
    if text_encoders:
        _assert_deltas(lora.text_encoder, ref.text_encoder)
        _assert_deltas(lora.text_encoder_2, ref.text_encoder_2)


# ---------------------------------------------------------------------------------------------
# Round trips, one per layout
# ---------------------------------------------------------------------------------------------


def test_reference_covers_every_flux_linear(transformer: torch.nn.Module, ref: km.RefLora) -> None:
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(ref.transformer) == set(linears)
    assert flux_lora_targets(transformer) == linears


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_diffusers_layout(tmp_path: Path, ref: km.RefLora, prefix: str) -> None:
    sd = km.to_diffusers(ref, prefix=prefix, with_text_encoders=bool(prefix))
    lora = read_lora(_save(tmp_path, "d.safetensors", sd))
    assert lora.source_format == "diffusers"
    _assert_all(lora, ref, text_encoders=bool(prefix))


def test_diffusers_layout_lora_down_up_names(tmp_path: Path, ref: km.RefLora) -> None:
    sd = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
          for k, v in km.to_diffusers(ref).items()}
    _assert_all(read_lora(_save(tmp_path, "d.safetensors", sd)), ref)


def test_kohya_layout(tmp_path: Path, ref: km.RefLora) -> None:
    lora = read_lora(_save(tmp_path, "k.safetensors", km.to_kohya(ref)))
    assert lora.source_format == "kohya"
    _assert_all(lora, ref)
    # the layers diffusers 0.42.1 drops or mis-scales are all here
    for name in ("x_embedder", "context_embedder", "time_text_embed.guidance_embedder.linear_1",
                 "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                 "proj_out", "norm_out.linear"):
        assert name in lora.transformer


def test_kohya_layout_other_width(tmp_path: Path) -> None:
    """linear1 is split from the tensor shapes (diffusers hard-codes 3072/12288 and fails here)."""
    wide = _transformer(CONFIG_WIDE)
    ref = km.make_reference(wide, seed=3)
    lora = read_lora(_save(tmp_path, "k.safetensors", km.to_kohya(ref)))
    _assert_deltas(lora.transformer, ref.transformer)
    validate_against(lora, wide)
    assert lora.transformer["single_transformer_blocks.1.proj_mlp"].up.shape[0] == 96


def test_onetrainer_layout(tmp_path: Path, ref: km.RefLora) -> None:
    lora = read_lora(_save(tmp_path, "o.safetensors", km.to_onetrainer(ref)))
    assert lora.source_format == "kohya"
    _assert_deltas(lora.transformer, ref.transformer)


@pytest.mark.parametrize(
    ("names", "prefix", "with_alpha"),
    [
        ("lora_AB", "diffusion_model.", False),
        ("lora_AB", "", True),
        ("lora_down_up", "diffusion_model.", True),
        ("lora_down_up", "", False),
        ("lora_AB", "base_model.model.", True),  # fal / PEFT-saved BFL names
    ],
)
def test_bfl_layout(tmp_path: Path, ref: km.RefLora, names: str, prefix: str, with_alpha: bool) -> None:
    sd = km.to_bfl(ref, names=names, prefix=prefix, with_alpha=with_alpha)
    lora = read_lora(_save(tmp_path, "b.safetensors", sd))
    assert lora.source_format == "bfl"
    _assert_deltas(lora.transformer, ref.transformer)


def test_comfyui_text_encoder_names(tmp_path: Path, ref: km.RefLora) -> None:
    sd = km.to_bfl(ref, names="lora_down_up")
    for comp, layers in (("text_encoders.clip_l.transformer.", ref.text_encoder),
                         ("text_encoders.t5xxl.transformer.", ref.text_encoder_2)):
        for name, layer in layers.items():
            km._put(sd, comp + name, layer.down, layer.up, layer.alpha, ".lora_down.weight", ".lora_up.weight", True)
    _assert_all(read_lora(_save(tmp_path, "c.safetensors", sd)), ref)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_layout(tmp_path: Path, ref: km.RefLora, prefix: str) -> None:
    lora = read_lora(_save(tmp_path, "x.safetensors", km.to_xlabs(ref, prefix=prefix)))
    assert lora.source_format == "xlabs"
    _assert_deltas(lora.transformer, ref.transformer, only=km.xlabs_layers(ref))
    assert all(layer.scale == 1.0 for layer in lora.transformer.values())


def test_kohya_split_qkv_block_diagonal(tmp_path: Path, transformer: torch.nn.Module) -> None:
    """sd-scripts ``split_qkv`` saves q/k/v as one rank-3r LoRA with a block-diagonal up: it is
    split back into three rank-r LoRAs with the same deltas."""
    g = torch.Generator().manual_seed(5)
    r, h, alpha = 2, 32, 4.0
    downs = [torch.randn(r, h, generator=g) for _ in range(3)]
    ups = [torch.randn(h, r, generator=g) for _ in range(3)]
    up = torch.zeros(3 * h, 3 * r)
    for i in range(3):
        up[i * h:(i + 1) * h, i * r:(i + 1) * r] = ups[i]
    sd = {
        "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.cat(downs),
        "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(alpha),
    }
    lora = read_lora(_save(tmp_path, "s.safetensors", sd))
    for i, x in enumerate("qkv"):
        layer = lora.transformer[f"transformer_blocks.1.attn.to_{x}"]
        assert layer.rank == r
        torch.testing.assert_close(layer.delta(), alpha / (3 * r) * ups[i] @ downs[i], atol=ATOL, rtol=0)
    validate_against(lora, transformer)


def test_diffusers_metadata_alphas(tmp_path: Path) -> None:
    """diffusers' ``lora_adapter_metadata`` (lora_alpha + alpha_pattern) sets the scales."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    meta = {"lora_adapter_metadata": json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"attn.to_k": 2},
    })}
    lora = read_lora(_save(tmp_path, "m.safetensors", sd, metadata=meta))
    assert lora.transformer["transformer_blocks.0.attn.to_q"].scale == pytest.approx(2.0)
    assert lora.transformer["transformer_blocks.0.attn.to_k"].scale == pytest.approx(0.5)


def test_tensors_keep_the_file_dtype_and_are_independent(tmp_path: Path, ref: km.RefLora) -> None:
    sd = {k: v.to(torch.bfloat16) for k, v in km.to_kohya(ref).items()}
    lora = read_lora(_save(tmp_path, "bf16.safetensors", sd))
    q = lora.transformer["single_transformer_blocks.0.attn.to_q"]
    k = lora.transformer["single_transformer_blocks.0.attn.to_k"]
    assert q.down.dtype == torch.bfloat16 and q.up.dtype == torch.bfloat16 and q.up.is_contiguous()
    assert q.down.data_ptr() != k.down.data_ptr()
    assert lora.nbytes() > 0 and lora.max_rank == 4


def test_a_file_changed_in_place_after_reading_leaves_the_read_lora_unchanged(tmp_path: Path, ref: km.RefLora) -> None:
    """What the engine keeps in RAM is its own memory, not a view of the file: a tool that rewrites
    the file in place (same inode, shortened) neither changes the read LoRA nor crashes the process."""
    path = _save(tmp_path, "inplace.safetensors", km.to_kohya(ref))
    lora = read_lora(path)
    before = {n: (layer.down.clone(), layer.up.clone()) for n, layer in lora.transformer.items()}
    size = Path(path).stat().st_size
    with open(path, "r+b") as fh:  # zeros over the data, then cut the file short
        fh.seek(size // 2)
        fh.write(bytes(size - size // 2))
        fh.truncate(size // 3)
    for n, layer in lora.transformer.items():
        assert torch.equal(layer.down, before[n][0]) and torch.equal(layer.up, before[n][1]), n


def test_tensors_at_unaligned_offsets_and_odd_dtypes_are_read(tmp_path: Path) -> None:
    """safetensors does not require a tensor's bytes to be aligned to its element size; such a file
    reads the same as an aligned one (other writers than safetensors' own make them)."""
    import json
    import struct

    down = torch.randn(2, 8, dtype=torch.bfloat16)
    up = torch.randn(8, 2, dtype=torch.float32)
    parts = [("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "BF16", down),
             ("transformer.transformer_blocks.0.attn.to_q.alpha", "U8", torch.tensor(4, dtype=torch.uint8)),  # 1 byte
             ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", "F32", up)]
    header, blobs, pos = {}, [], 0
    for key, dtype, t in parts:
        blob = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "unaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    layer = read_lora(path).transformer["transformer_blocks.0.attn.to_q"]  # up (F32) starts at byte 33
    assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and layer.scale == 2.0


def test_all_zero_diff_keys_are_skipped_with_a_log(tmp_path: Path, ref: km.RefLora, caplog) -> None:
    sd = km.to_bfl(ref)
    sd["diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff_b"] = torch.zeros(16)
    sd["diffusion_model.img_in.diff_b"] = torch.zeros(32)
    with caplog.at_level(logging.INFO, logger="fastlora_core.lora.formats"):
        lora = read_lora(_save(tmp_path, "z.safetensors", sd))
    _assert_deltas(lora.transformer, ref.transformer)
    assert "all-zero" in caplog.text


# ---------------------------------------------------------------------------------------------
# Same deltas as diffusers' own loader for a diffusers-format file
# ---------------------------------------------------------------------------------------------


def test_matches_diffusers_load_lora_weights(tmp_path: Path, transformer: torch.nn.Module, ref: km.RefLora) -> None:
    from fastlora_core.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.transformer = _transformer(CONFIG_2X2)
    # One alpha value for every layer (ranks 2/3/4, so scales still differ). With mixed alphas,
    # diffusers 0.42.1 + PEFT disagree with the file (our reading follows kohya/ComfyUI):
    #  * layers without an ``.alpha`` key get the most common alpha instead of scale 1;
    #  * an alpha_pattern entry for the top-level ``proj_out`` also matches every
    #    ``single_transformer_blocks.N.proj_out`` (PEFT matches pattern suffixes).
    def same_alpha(layers: dict[str, km.RefLayer]) -> dict[str, km.RefLayer]:
        return {n: km.RefLayer(layer.down, layer.up, 8.0) for n, layer in layers.items()}

    sub = km.RefLora(same_alpha(ref.transformer), same_alpha(ref.text_encoder), {}, ref.num_double, ref.num_single)
    path = _save(tmp_path, "d.safetensors", km.to_diffusers(sub))
    pipe.load_lora_weights(str(path), adapter_name="x")
    ours = read_lora(path)

    def peft_delta(model: torch.nn.Module, name: str) -> torch.Tensor:
        m = dict(model.named_modules())[name]
        return m.lora_B["x"].weight @ m.lora_A["x"].weight * m.scaling["x"]

    for name, layer in ours.transformer.items():
        torch.testing.assert_close(peft_delta(pipe.transformer, name), layer.delta(), atol=ATOL, rtol=0, msg=name)
    clip_names = {n.removeprefix("text_model.") if not hasattr(pipe.text_encoder, "text_model") else n: layer
                  for n, layer in ours.text_encoder.items()}
    for name, layer in clip_names.items():
        torch.testing.assert_close(peft_delta(pipe.text_encoder, name), layer.delta(), atol=ATOL, rtol=0, msg=name)
    # model side helpers see through PEFT wrappers and torch.compile wrappers
    assert flux_lora_targets(pipe.transformer) == flux_lora_targets(transformer)
    assert flux_lora_targets(torch.compile(pipe.transformer)) == flux_lora_targets(transformer)
    validate_against(ours, pipe.transformer, text_encoder=pipe.text_encoder)


# ---------------------------------------------------------------------------------------------
# validate_against
# ---------------------------------------------------------------------------------------------


def test_validate_against_ok_and_mismatch(tmp_path: Path, transformer: torch.nn.Module, ref: km.RefLora) -> None:
    lora = read_lora(_save(tmp_path, "ok.safetensors", km.to_kohya(ref)))
    validate_against(lora, transformer)

    wide_ref = km.make_reference(_transformer(CONFIG_WIDE), seed=2)
    wide = read_lora(_save(tmp_path, "wide.safetensors", km.to_bfl(wide_ref)))
    with pytest.raises(LoraFitError, match=r"wide\.safetensors.*another size"):
        validate_against(wide, transformer)

    extra = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(2, 32),
             "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 2)}
    deep = read_lora(_save(tmp_path, "deep.safetensors", extra))
    with pytest.raises(LoraFitError, match=r"deep\.safetensors.*transformer_blocks\.7\.attn\.to_q: no such layer"):
        validate_against(deep, transformer)


# ---------------------------------------------------------------------------------------------
# Errors: each names the file
# ---------------------------------------------------------------------------------------------


def _pair(base: str, rank: int = 2, n_in: int = 32, n_out: int = 32, down: str = ".lora_down.weight",
          up: str = ".lora_up.weight") -> dict[str, torch.Tensor]:
    return {base + down: torch.randn(rank, n_in), base + up: torch.randn(n_out, rank)}


def _write_raw(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _truncated(tmp_path: Path, ref: km.RefLora) -> Path:
    path = _save(tmp_path, "trunc.safetensors", km.to_kohya(ref))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pickle(tmp_path: Path) -> Path:
    path = tmp_path / "pickled.safetensors"
    torch.save({"a": torch.zeros(2)}, str(path))
    return path


FLUX_OK = _pair("lora_unet_double_blocks_0_img_attn_proj")
ERROR_CASES = {
    "missing": (lambda tmp, ref: tmp / "nope.safetensors", r"not found"),
    "folder": (lambda tmp, ref: (tmp / "dir.safetensors").mkdir() or tmp / "dir.safetensors", r"folder"),
    "empty_file": (lambda tmp, ref: _write_raw(tmp, "empty.safetensors", b""), r"empty \(0 bytes\)"),
    "garbage": (lambda tmp, ref: _write_raw(tmp, "garbage.safetensors", b"\x07" * 100), r"not a readable safetensors"),
    "truncated": (_truncated, r"truncated or corrupt"),
    "pickle": (lambda tmp, ref: _pickle(tmp), r"pickle"),
    "no_tensors": (lambda tmp, ref: _save(tmp, "none.safetensors", {}), r"holds no tensors"),
    "sdxl": (lambda tmp, ref: _save(tmp, "sdxl.safetensors", _pair(
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")), r"Stable Diffusion.*SDXL"),
    "sd15_compvis": (lambda tmp, ref: _save(tmp, "sd15.safetensors", _pair(
        "lora_unet_input_blocks_1_1_proj_in")), r"Stable Diffusion"),
    "sd3": (lambda tmp, ref: _save(tmp, "sd3.safetensors", _pair(
        "diffusion_model.joint_blocks.0.x_block.attn.qkv")), r"Stable Diffusion 3"),
    "wan": (lambda tmp, ref: _save(tmp, "wan.safetensors", _pair(
        "diffusion_model.blocks.0.self_attn.q", down=".lora_A.weight", up=".lora_B.weight")), r"Wan"),
    "unknown_family": (lambda tmp, ref: _save(tmp, "odd.safetensors", _pair("foo.bar.baz")),
                       r"not a Flux\.1 LoRA"),
    "leftover_key": (lambda tmp, ref: _save(tmp, "leftover.safetensors", {
        **km.to_diffusers(ref), **_pair("transformer.transformer_blocks.0.attn.to_qq", down=".lora_A.weight",
                                        up=".lora_B.weight")}), r"does not understand.*to_qq"),
    "leftover_nonlora_key": (lambda tmp, ref: _save(tmp, "extra.safetensors", {
        **FLUX_OK, "lora_unet_double_blocks_0_img_attn_proj.scale_weight": torch.ones(1)}), r"scale_weight"),
    "nonzero_diff_on_a_norm": (lambda tmp, ref: _save(tmp, "diff.safetensors", {
        **FLUX_OK, "diffusion_model.double_blocks.0.img_attn.norm.key_norm.diff_b": torch.ones(16)}),
        r"not linear layers.*key_norm\.diff_b"),
    "oft": (lambda tmp, ref: _save(tmp, "oft.safetensors", {
        "lycoris_transformer_blocks_0_attn_to_q.oft_blocks": torch.ones(4, 8, 8)}), r"OFT.*oft_blocks"),
    "boft": (lambda tmp, ref: _save(tmp, "boft.safetensors", {
        "base_model.model.transformer_blocks.0.attn.to_q.boft_R": torch.ones(1, 4, 8, 8)}), r"BOFT"),
    "glora": (lambda tmp, ref: _save(tmp, "glora.safetensors", {
        "lora_unet_double_blocks_0_img_attn_proj.a1.weight": torch.ones(2, 32),
        "lora_unet_double_blocks_0_img_attn_proj.a2.weight": torch.ones(32, 2)}), r"GLoRA"),
    "ia3": (lambda tmp, ref: _save(tmp, "ia3.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.ia3_l": torch.ones(32, 1)}), r"\(IA\)\^3"),
    "lokr_incomplete": (lambda tmp, ref: _save(tmp, "lokr.safetensors", {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.ones(4, 4)}), r"incomplete.*lokr.*w2"),
    "lokr_mixed_with_loha": (lambda tmp, ref: _save(tmp, "mixed.safetensors", {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.ones(4, 4),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.ones(8, 8),
        "lycoris_transformer_blocks_0_attn_to_q.hada_w1_a": torch.ones(32, 2)}), r"mixes loha and lokr"),
    "loha_factors_do_not_fit": (lambda tmp, ref: _save(tmp, "loha.safetensors", {
        "lora_unet_double_blocks_0_img_attn_proj.hada_w1_a": torch.ones(32, 2),
        "lora_unet_double_blocks_0_img_attn_proj.hada_w1_b": torch.ones(2, 32),
        "lora_unet_double_blocks_0_img_attn_proj.hada_w2_a": torch.ones(32, 2),
        "lora_unet_double_blocks_0_img_attn_proj.hada_w2_b": torch.ones(3, 32)}), r"do not fit together"),
    "dora_scale_shape": (lambda tmp, ref: _save(tmp, "dora.safetensors", {
        **FLUX_OK, "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(2, 32)}),
        r"dora_scale has shape \(2, 32\)"),
    "dora_in_axis_on_fused_qkv": (lambda tmp, ref: _save(tmp, "doraqkv.safetensors", {
        **_pair("lora_unet_double_blocks_0_img_attn_qkv", n_out=96),
        "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(1, 32)}), r"per-input-column.*fused"),
    "dora_peft_metadata_without_magnitudes": (lambda tmp, ref: _save(
        tmp, "dora3.safetensors", _pair("transformer.proj_out", down=".lora_A.weight", up=".lora_B.weight", n_out=16),
        metadata={"lora_adapter_metadata": json.dumps({"transformer.use_dora": True})}), r"holds no DoRA magnitudes"),
    "flux_control": (lambda tmp, ref: _save(tmp, "canny.safetensors", {
        **_pair("double_blocks.0.img_attn.proj", down=".lora_A.weight", up=".lora_B.weight"),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}), r"Flux Control"),
    "down_without_up": (lambda tmp, ref: _save(tmp, "half.safetensors", {
        **FLUX_OK, "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight": torch.ones(2, 32)}),
        r"incomplete.*txt_attn_proj"),
    "rank_mismatch": (lambda tmp, ref: _save(tmp, "rank.safetensors", {
        "lora_unet_img_in.lora_down.weight": torch.ones(2, 16),
        "lora_unet_img_in.lora_up.weight": torch.ones(32, 3)}), r"rank 2.*rank 3"),
    "rank_zero": (lambda tmp, ref: _save(tmp, "rank0.safetensors", {
        "lora_unet_img_in.lora_down.weight": torch.ones(0, 16),
        "lora_unet_img_in.lora_up.weight": torch.ones(32, 0)}), r"lora_unet_img_in.*rank 0.*no LoRA weights"),
    "bad_qkv_rows": (lambda tmp, ref: _save(tmp, "rows.safetensors", _pair(
        "lora_unet_double_blocks_0_img_attn_qkv", n_out=50)), r"cannot be split"),
    "conv_lora": (lambda tmp, ref: _save(tmp, "conv.safetensors", {
        "lora_unet_img_in.lora_down.weight": torch.ones(2, 16, 1, 1),
        "lora_unet_img_in.lora_up.weight": torch.ones(32, 2, 1, 1)}), r"2-D"),
    "duplicate_layer": (lambda tmp, ref: _save(tmp, "dup.safetensors", {
        **FLUX_OK, **_pair("transformer.transformer_blocks.0.attn.to_out.0", down=".lora_A.weight",
                           up=".lora_B.weight")}), r"two entries.*to_out\.0"),
    "clip_g_under_te2": (lambda tmp, ref: _save(tmp, "te2.safetensors", _pair(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")), r"CLIP-G.*lora_te2_text_model"),
    "only_zero_keys": (lambda tmp, ref: _save(tmp, "zeros.safetensors", {"diffusion_model.img_in.diff_b": torch.zeros(4)}),
                       r"holds no LoRA weights"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_the_file(tmp_path: Path, ref: km.RefLora, case: str) -> None:
    make, pattern = ERROR_CASES[case]
    path = make(tmp_path, ref)
    with pytest.raises(LoraFormatError) as info:
        read_lora(path)
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(pattern, message, flags=re.S), message
