"""Test helper: one reference LoRA written in every Flux LoRA layout.

The key mapping here is written independently of ``fastlora_core.lora.formats`` (from the BFL
Flux source and the trainers' naming), so that the format tests compare two separate
implementations. The reference LoRA uses one shared ``down`` per fused group (img qkv, txt qkv,
single-block linear1 = q/k/v/proj_mlp) and one alpha per group, so fusing is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# BFL module (block-relative) -> diffusers module(s) (block-relative), in row order of the fused up.
BFL_DOUBLE_TO_DIFFUSERS: dict[str, list[str]] = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
BFL_SINGLE_TO_DIFFUSERS: dict[str, list[str]] = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
BFL_GLOBAL_TO_DIFFUSERS: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # BFL rows (shift, scale), diffusers (scale, shift)
}
XLABS_DOUBLE_TO_DIFFUSERS: dict[str, list[str]] = {
    "qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "proj_lora1": ["attn.to_out.0"],
    "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "proj_lora2": ["attn.to_add_out"],
}
XLABS_SINGLE_TO_DIFFUSERS: dict[str, list[str]] = {
    "qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "proj_lora": ["proj_out"],
}

CLIP_TARGETS = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.1.mlp.fc1",
)
T5_TARGETS = (
    "encoder.block.0.layer.0.SelfAttention.q",
    "encoder.block.1.layer.1.DenseReluDense.wi_0",
)


@dataclass
class RefLayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)


@dataclass
class RefLora:
    transformer: dict[str, RefLayer]
    text_encoder: dict[str, RefLayer]
    text_encoder_2: dict[str, RefLayer]
    num_double: int
    num_single: int


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def make_reference(
    transformer: torch.nn.Module,
    seed: int = 0,
    clip_shapes: dict[str, tuple[int, int]] | None = None,
    t5_shapes: dict[str, tuple[int, int]] | None = None,
) -> RefLora:
    """A random LoRA on every Linear of ``transformer`` (fused groups share down and alpha),
    with varied ranks and alphas (some layers without alpha)."""
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(transformer)
    num_double = len({n.split(".")[1] for n in shapes if n.startswith("transformer_blocks.")})
    num_single = len({n.split(".")[1] for n in shapes if n.startswith("single_transformer_blocks.")})
    alphas = [8.0, None, 2.0, 3.0, 16.0]
    ranks = [4, 2, 3]
    counter = [0]

    def pick() -> tuple[int, float | None]:
        i = counter[0]
        counter[0] += 1
        return ranks[i % len(ranks)], alphas[i % len(alphas)]

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g) * 0.3

    layers: dict[str, RefLayer] = {}
    groups: list[list[str]] = []
    for i in range(num_double):
        groups.append([f"transformer_blocks.{i}.attn.to_{x}" for x in "qkv"])
        groups.append([f"transformer_blocks.{i}.attn.add_{x}_proj" for x in "qkv"])
    for i in range(num_single):
        groups.append([f"single_transformer_blocks.{i}.attn.to_{x}" for x in "qkv"]
                      + [f"single_transformer_blocks.{i}.proj_mlp"])
    grouped = {n for grp in groups for n in grp}
    for grp in groups:
        rank, alpha = pick()
        down = rand(rank, shapes[grp[0]][1])
        for n in grp:
            layers[n] = RefLayer(down, rand(shapes[n][0], rank), alpha)
    for name, (out_f, in_f) in sorted(shapes.items()):
        if name in grouped:
            continue
        rank, alpha = pick()
        layers[name] = RefLayer(rand(rank, in_f), rand(out_f, rank), alpha)

    def te(sh: dict[str, tuple[int, int]] | None) -> dict[str, RefLayer]:
        out = {}
        for name, (out_f, in_f) in sorted((sh or {}).items()):
            rank, alpha = pick()
            out[name] = RefLayer(rand(rank, in_f), rand(out_f, rank), alpha)
        return out

    return RefLora(layers, te(clip_shapes), te(t5_shapes), num_double, num_single)


# ------------------------------------------------------------------------------------------------
# Writers (each returns a state dict; the caller saves it)
# ------------------------------------------------------------------------------------------------


def _put(sd: dict, base: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
         down_name: str, up_name: str, with_alpha: bool, alpha_name: str = ".alpha") -> None:
    if alpha is not None and not with_alpha:
        up = up * (alpha / down.shape[0])  # bake the scale in: the same delta, scale 1
        alpha = None
    sd[base + down_name] = down.clone().contiguous()  # clone: safetensors refuses shared storage
    sd[base + up_name] = up.clone().contiguous()
    if alpha is not None:
        sd[base + alpha_name] = torch.tensor(alpha)


def to_diffusers(ref: RefLora, prefix: str = "transformer.", with_alpha: bool = True,
                 with_text_encoders: bool = True) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, layer in ref.transformer.items():
        _put(sd, prefix + name, layer.down, layer.up, layer.alpha, ".lora_A.weight", ".lora_B.weight", with_alpha)
    if with_text_encoders:
        for comp, layers in (("text_encoder.", ref.text_encoder), ("text_encoder_2.", ref.text_encoder_2)):
            for name, layer in layers.items():
                _put(sd, comp + name, layer.down, layer.up, layer.alpha, ".lora_A.weight", ".lora_B.weight",
                     with_alpha)
    return sd


def _fused(ref: RefLora, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    parts = [ref.transformer.get(n) for n in names]
    if all(p is None for p in parts):
        return None
    assert all(p is not None for p in parts), f"partial fused group {names}"
    down = parts[0].down  # type: ignore[union-attr]
    for p in parts:
        assert torch.equal(p.down, down) and p.alpha == parts[0].alpha, names  # type: ignore[union-attr]
    return down, torch.cat([p.up for p in parts], dim=0), parts[0].alpha  # type: ignore[union-attr]


def bfl_modules(ref: RefLora) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """BFL module name -> (down, fused up, alpha) for the layers of ``ref``."""
    out = {}
    for i in range(ref.num_double):
        for bfl, diff in BFL_DOUBLE_TO_DIFFUSERS.items():
            f = _fused(ref, [f"transformer_blocks.{i}.{d}" for d in diff])
            if f is not None:
                out[f"double_blocks.{i}.{bfl}"] = f
    for i in range(ref.num_single):
        for bfl, diff in BFL_SINGLE_TO_DIFFUSERS.items():
            f = _fused(ref, [f"single_transformer_blocks.{i}.{d}" for d in diff])
            if f is not None:
                out[f"single_blocks.{i}.{bfl}"] = f
    for bfl, diff in BFL_GLOBAL_TO_DIFFUSERS.items():
        layer = ref.transformer.get(diff)
        if layer is None:
            continue
        up = layer.up
        if bfl == "final_layer.adaLN_modulation.1":
            scale_rows, shift_rows = up.chunk(2, dim=0)
            up = torch.cat([shift_rows, scale_rows], dim=0)
        out[bfl] = (layer.down, up, layer.alpha)
    return out


def to_bfl(ref: RefLora, names: str = "lora_AB", prefix: str = "diffusion_model.",
           with_alpha: bool = True) -> dict[str, torch.Tensor]:
    down_name, up_name = (".lora_A.weight", ".lora_B.weight") if names == "lora_AB" else (
        ".lora_down.weight", ".lora_up.weight")
    sd: dict[str, torch.Tensor] = {}
    for bfl, (down, up, alpha) in bfl_modules(ref).items():
        _put(sd, prefix + bfl, down, up, alpha, down_name, up_name, with_alpha)
    return sd


def to_kohya(ref: RefLora) -> dict[str, torch.Tensor]:
    """sd-scripts naming: lora_unet_<BFL name with _>, lora_te1_ (CLIP-L), lora_te3_ (T5)."""
    sd: dict[str, torch.Tensor] = {}
    for bfl, (down, up, alpha) in bfl_modules(ref).items():
        _put(sd, "lora_unet_" + bfl.replace(".", "_"), down, up, alpha, ".lora_down.weight", ".lora_up.weight",
             True)
    for prefix, layers in (("lora_te1_", ref.text_encoder), ("lora_te3_", ref.text_encoder_2)):
        for name, layer in layers.items():
            _put(sd, prefix + name.replace(".", "_"), layer.down, layer.up, layer.alpha, ".lora_down.weight",
                 ".lora_up.weight", True)
    return sd


def to_onetrainer(ref: RefLora) -> dict[str, torch.Tensor]:
    """kohya-style keys on diffusers module names: lora_transformer_<diffusers name with _>."""
    sd: dict[str, torch.Tensor] = {}
    for name, layer in ref.transformer.items():
        _put(sd, "lora_transformer_" + name.replace(".", "_"), layer.down, layer.up, layer.alpha,
             ".lora_down.weight", ".lora_up.weight", True)
    return sd


def xlabs_layers(ref: RefLora) -> set[str]:
    out = set()
    for i in range(ref.num_double):
        for diff in XLABS_DOUBLE_TO_DIFFUSERS.values():
            out.update(f"transformer_blocks.{i}.{d}" for d in diff)
    for i in range(ref.num_single):
        for diff in XLABS_SINGLE_TO_DIFFUSERS.values():
            out.update(f"single_transformer_blocks.{i}.{d}" for d in diff)
    return out


def to_xlabs(ref: RefLora, prefix: str = "") -> dict[str, torch.Tensor]:
    """XLabs processor naming; no alpha (scale baked into up)."""
    sd: dict[str, torch.Tensor] = {}
    for kind, count, table, block in (
        ("double_blocks", ref.num_double, XLABS_DOUBLE_TO_DIFFUSERS, "transformer_blocks"),
        ("single_blocks", ref.num_single, XLABS_SINGLE_TO_DIFFUSERS, "single_transformer_blocks"),
    ):
        for i in range(count):
            for xl, diff in table.items():
                parts = [ref.transformer[f"{block}.{i}.{d}"] for d in diff]
                down = parts[0].down
                up = torch.cat([p.up * p.scale for p in parts], dim=0)
                sd[f"{prefix}{kind}.{i}.processor.{xl}.down.weight"] = down.clone().contiguous()
                sd[f"{prefix}{kind}.{i}.processor.{xl}.up.weight"] = up.contiguous()
    return sd
