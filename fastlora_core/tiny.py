"""A tiny random-weight Flux pipeline and random LoRAs, built locally (no download).

Used by the demo, the tests and ``python -m fastlora_core write-tiny`` (install smoke tests).
The transformer follows diffusers' own Flux test configuration; layer widths are multiples of 64
where bitsandbytes needs it (T5 feed-forward).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_names import TINY_DIFFUSERS_NAME, TINY_SINGLE_FILES, TINY_TOKENIZERS

logger = logging.getLogger(__name__)

TINY_TRANSFORMER_CONFIG: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": None,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
    "guidance_embeds": True,
}

# LoRA target groups of the tiny model, by diffusers module name.
ATTN_TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
)
CONTEXT_TARGETS = (
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
)
MLP_TARGETS = (
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.0.proj",
    "transformer_blocks.0.ff_context.net.2",
)
SINGLE_TARGETS = (
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.proj_out",
)
EMBED_TARGETS = ("x_embedder", "context_embedder", "proj_out")

# The demo / smoke-test LoRAs: different ranks and targets on purpose (names: tiny_names.TINY_LORA_NAMES).
TINY_LORAS: dict[str, dict[str, object]] = {
    "fastlora-tiny-style": {"targets": ATTN_TARGETS, "rank": 4, "seed": 1},
    "fastlora-tiny-character": {"targets": ATTN_TARGETS + MLP_TARGETS, "rank": 8, "seed": 2},
    "fastlora-tiny-wide": {
        "targets": ATTN_TARGETS + CONTEXT_TARGETS + MLP_TARGETS + SINGLE_TARGETS,
        "rank": 16,
        "seed": 3,
    },
    "fastlora-tiny-single": {"targets": SINGLE_TARGETS + EMBED_TARGETS, "rank": 2, "seed": 4},
}


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def _t5_tokenizer():
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in letters]
    vocab += [(c, -2.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                        transformer: Mapping[str, object] | None = None):
    """A FluxPipeline with random weights, deterministic for a given seed. ``transformer``: changes to
    :data:`TINY_TRANSFORMER_CONFIG` (e.g. ``{"num_layers": 3}`` for several blocks of a class)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    torch.manual_seed(seed)
    flux = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **(transformer or {})})
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(clip_tok),
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
        )
    )
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(  # type: ignore[call-arg]
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    # Inference modules: eval mode (the tiny T5 has dropout) and no gradients, as from_pretrained gives.
    for module in (flux, clip, t5, vae):
        module.eval().requires_grad_(False)  # type: ignore[union-attr]
    pipe = FluxPipeline(
        scheduler=scheduler,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        vae=vae,
        transformer=flux,
    )
    return pipe.to(dtype)  # type: ignore[attr-defined]


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder (``model_index.json`` + components)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    logger.info("wrote tiny Flux diffusers folder to %s", folder)
    return folder


def module_shapes(transformer: torch.nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    mods = dict(transformer.named_modules())
    out: dict[str, tuple[int, int]] = {}
    for n in names:
        m = mods[n]
        out[n] = (m.out_features, m.in_features)
    return out


def random_lora_state_dict(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    seed: int,
    alpha: float | None = None,
    scale: float = 0.5,
    prefix: str = "transformer.",
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA (``<prefix><module>.lora_A.weight`` / ``lora_B``) with random,
    non-zero weights so that it visibly changes the output. ``alpha`` (if given) is stored as
    ``<module>.alpha`` keys, which diffusers' converter understands."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in sorted(shapes.items()):
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * (scale / in_f**0.5)
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * (scale / rank**0.5)
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def write_tiny_loras(
    folder: str | Path,
    transformer: torch.nn.Module | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the TINY_LORAS set as diffusers-format safetensors files; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if transformer is None:
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)  # type: ignore[assignment]
    out: dict[str, Path] = {}
    for name in names or list(TINY_LORAS):
        spec = TINY_LORAS[name]
        shapes = module_shapes(transformer, spec["targets"])  # type: ignore[arg-type]
        sd = random_lora_state_dict(shapes, int(spec["rank"]), int(spec["seed"]), scale=1.5)  # type: ignore[call-overload]
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        out[name] = path
    return out


# ComfyUI's bundled tokenizers (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer), which the
# pack uses for single files: the tiny text encoders of the single files take their token ids.
COMFY_CLIP_VOCAB = 49408  # CLIP-L: ids up to <|endoftext|> = 49407
COMFY_CLIP_BOS, COMFY_CLIP_EOS = 49406, 49407
COMFY_T5_VOCAB = 32128  # T5-XXL (sentencepiece 32000 + 100 extra ids, padded)


def _with_comfy_vocab(pipe, seed: int):
    """``pipe`` with text encoders wide enough for ComfyUI's real CLIP-L / T5 tokenizers (new
    embedding rows random, seeded) and CLIP's real start/end token ids, so the single files run
    with the tokenizers ComfyUI ships."""
    torch.manual_seed(seed + 10)
    clip, t5 = pipe.text_encoder, pipe.text_encoder_2
    clip.resize_token_embeddings(COMFY_CLIP_VOCAB, mean_resizing=False)
    t5.resize_token_embeddings(COMFY_T5_VOCAB, mean_resizing=False)
    clip.config.bos_token_id, clip.config.eos_token_id = COMFY_CLIP_BOS, COMFY_CLIP_EOS
    clip.config.pad_token_id = COMFY_CLIP_EOS
    for module in clip.modules():  # the module that pools at the end token keeps its own copy
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = COMFY_CLIP_EOS
    return pipe


def write_comfy_single_files(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny Flux as the four single files a ComfyUI user has (``TINY_SINGLE_FILES``:
    BFL-layout transformer in ``diffusion_models``, CLIP-L and T5 in ``text_encoders``, the
    autoencoder in ``vae``) plus the tiny tokenizers in ``fastlora-tiny-tokenizers/`` (ComfyUI uses
    its bundled ones). Returns ``{"transformer", "clip_l", "t5xxl", "vae", "tokenizer_dir"} -> Path``."""
    import shutil
    import tempfile

    from .loading import write_single_files

    models_dir = Path(models_dir)
    pipe = _with_comfy_vocab(build_tiny_pipeline(seed), seed)
    out: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="fastlora-tiny-") as tmp:
        written = write_single_files(pipe, tmp, "bfl")
        for role, (folder, name) in TINY_SINGLE_FILES.items():
            target = models_dir / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(written[role]), target)
            out[role] = target
        tokenizers = models_dir / TINY_TOKENIZERS
        shutil.rmtree(tokenizers, ignore_errors=True)
        shutil.move(str(written["tokenizer_dir"]), tokenizers)
        out["tokenizer_dir"] = tokenizers
    logger.info("wrote tiny Flux single files under %s", models_dir)
    return out


def write_comfy_tree(models_dir: str | Path, seed: int = 0) -> dict[str, object]:
    """Write the tiny model into a ComfyUI ``models/`` tree: ``diffusers/fastlora-tiny-flux``, the
    same model as single files (``write_comfy_single_files``) and ``loras/fastlora-tiny-*.safetensors``,
    so every shipped workflow (diffusers folder or single files) runs on it. Returns what was written."""
    models_dir = Path(models_dir)
    model_dir = write_tiny_model(models_dir / "diffusers" / TINY_DIFFUSERS_NAME, seed)
    singles = write_comfy_single_files(models_dir, seed)
    loras = write_tiny_loras(models_dir / "loras")
    manifest = {"diffusers": str(model_dir), "single_files": {k: str(v) for k, v in singles.items()},
                "loras": {k: str(v) for k, v in loras.items()}}
    (models_dir / "fastlora-tiny.json").write_text(json.dumps(manifest, indent=2))
    return manifest  # type: ignore[return-value]


# ComfyUI's model detection (comfy/model_detection.py at a125cd84) fixes Flux's widths (hidden 3072,
# 24 heads of 128, T5 context 4096, rope axes 16/56/56) and only counts blocks and reads the input
# and pooled widths from the file, so a Flux that ComfyUI's own UNETLoader can load is full-width:
# one double and one single block (550 M parameters, 1.1 GB in bf16) is the smallest.
COMFY_TINY_TRANSFORMER_CONFIG: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
}
COMFY_TINY_TRANSFORMER_NAME = "fastlora-comfy-tiny-flux.safetensors"


def write_comfy_tiny_transformer(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random Flux transformer that ComfyUI's UNETLoader loads (BFL layout, see
    ``COMFY_TINY_TRANSFORMER_CONFIG``), as ``dtype`` (bf16 weights load exactly into float32)."""
    from diffusers import FluxTransformer2DModel

    from .loading.writer import _diffusers_to_bfl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = COMFY_TINY_TRANSFORMER_CONFIG
    model = FluxTransformer2DModel(**cfg)
    sd = _diffusers_to_bfl(model.state_dict(), int(cfg["num_layers"]), int(cfg["num_single_layers"]))  # type: ignore[attr-defined,call-overload]
    del model
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
    logger.info("wrote ComfyUI-loadable tiny Flux transformer to %s", path)
    return path
