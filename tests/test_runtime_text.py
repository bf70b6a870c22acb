"""FastLoRA's own Flux text encoders (``fastlora_core.runtime.t5`` and ``.clip``) against transformers' classes.

Same config and weights -> the same state dict layout and the same outputs, bit for bit in float32
(and, as it turns out, in bf16 and fp16 too): T5's last hidden state (what Flux's transformer attends
to) and CLIP's pooled output (Flux's pooled projection) and last hidden state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fastlora_core.runtime.clip import CLIPTextEncoder
from fastlora_core.runtime.t5 import T5Encoder

ROOT = Path(__file__).resolve().parents[1]

# The brief's small T5 (gated-gelu, as T5-XXL v1.1) and the plain-relu original T5 feed-forward.
T5_SMALL: dict[str, Any] = {"vocab_size": 100, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
T5_RELU: dict[str, Any] = {**T5_SMALL, "feed_forward_proj": "relu", "num_layers": 3, "relative_attention_num_buckets": 8,
           "relative_attention_max_distance": 20}
CLIP_SMALL: dict[str, Any] = {"vocab_size": 120, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
# FLUX.1-dev's text_encoder/config.json has the pre-#24773 eos_token_id 2: pooled at the highest id.
CLIP_LEGACY: dict[str, Any] = {**CLIP_SMALL, "eos_token_id": 2}


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    from fastlora_core.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=5)


def _hf_t5(cfg: dict[str, Any], seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**cfg)).eval()


def _hf_clip(cfg: dict[str, Any], seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def _ours_like(ref: Any) -> Any:
    cls = T5Encoder if ref.__class__.__name__ == "T5EncoderModel" else CLIPTextEncoder
    ours = cls.from_config(ref.config.to_dict()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()]


def _t5_ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    """Three rows as the T5 tokenizer pads them: text, ``</s>`` (1), then ``<pad>`` (0), ends apart."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, length), generator=g)
    for row, end in enumerate((length // 3, length - 1, 1)):
        ids[row, end] = 1
        ids[row, end + 1:] = 0
    return ids


def _clip_ids(vocab: int, eos: int, pad: int, legacy: bool, seed: int = 2) -> torch.Tensor:
    """Three 77-token rows: ``<|startoftext|>`` (0), text, the end token at 5 / 40 / 76, then padding.
    For the legacy rule the end token is the highest id (as 49407 is in the real vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 1, (3, 77), generator=g)
    ids[:, 0] = 0
    end_id = vocab - 1 if legacy else eos
    for row, end in enumerate((5, 40, 76)):
        ids[row, end] = end_id
        ids[row, end + 1:] = pad
    return ids


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("cfg", [T5_SMALL, T5_RELU], ids=["gated-gelu", "relu"])
def test_t5_state_dict_is_transformers(cfg: dict[str, Any]) -> None:
    """Checkpoints, LoRA key maps and the loader's plans use transformers' names: same keys (the tied
    embedding under both ``shared`` and ``encoder.embed_tokens``), order, shapes, Linear leaves."""
    ref = _hf_t5(cfg)
    ours = T5Encoder.from_config(ref.config.to_dict())
    assert _layout(ours) == _layout(ref)
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in ours.state_dict()
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in ours.state_dict()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    linears = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)} and linears
    assert ours.config.d_model == cfg["d_model"] and ours.config.hidden_size == cfg["d_model"]
    assert ours.config.dense_act_fn == ref.config.dense_act_fn and ours.config.is_gated_act == ref.config.is_gated_act
    assert ours.dtype == ref.dtype == torch.float32 and ours.device == ref.device
    assert set(ours._keep_in_fp32_modules) == set(ref._keep_in_fp32_modules) == {"wo"}


@pytest.mark.parametrize("cfg", [CLIP_SMALL, CLIP_LEGACY], ids=["eos", "legacy-eos-2"])
def test_clip_state_dict_is_transformers(cfg: dict[str, Any]) -> None:
    """transformers 5's CLIPTextModel has no ``text_model.`` level and its ``position_ids`` buffer is
    not persistent: the keys are ``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*``."""
    ref = _hf_clip(cfg)
    ours = CLIPTextEncoder.from_config(ref.config.to_dict())
    assert _layout(ours) == _layout(ref)
    assert "embeddings.position_ids" not in ref.state_dict() and not list(ours.buffers())
    linears = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)} and linears
    assert ours.config.eos_token_id == cfg["eos_token_id"] and ours.dtype == torch.float32


def test_tiny_pipeline_encoders_have_transformers_layout(tiny_pipe: Any) -> None:
    """The encoders of the tiny Flux (``fastlora_core.tiny``) rebuilt from their config.json."""
    for ref, cls in ((tiny_pipe.text_encoder_2, T5Encoder), (tiny_pipe.text_encoder, CLIPTextEncoder)):
        assert _layout(cls.from_config(ref.config.to_dict())) == _layout(ref)


# ----------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("cfg", [T5_SMALL, T5_RELU], ids=["gated-gelu", "relu"])
@pytest.mark.parametrize("length", [16, 77])
def test_t5_last_hidden_state_is_bitwise_transformers(cfg: dict[str, Any], length: int) -> None:
    """What Flux's pipeline takes: ``text_encoder_2(ids, output_hidden_states=False)[0]``."""
    ref = _hf_t5(cfg, seed=3)
    ours = _ours_like(ref)
    ids = _t5_ids(cfg["vocab_size"], length)
    with torch.inference_mode():
        expected = ref(ids, output_hidden_states=False)[0]
        got = ours(ids, output_hidden_states=False)[0]
    assert got.shape == (3, length, cfg["d_model"]) and torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("cfg", [CLIP_SMALL, CLIP_LEGACY], ids=["eos", "legacy-eos-2"])
def test_clip_outputs_are_bitwise_transformers(cfg: dict[str, Any]) -> None:
    """``pooler_output`` (what Flux uses) and ``last_hidden_state``; the end token sits at a different
    place in each row, so pooling at the wrong position (or with the other eos rule) fails."""
    ref = _hf_clip(cfg, seed=4)
    ours = _ours_like(ref)
    ids = _clip_ids(cfg["vocab_size"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["eos_token_id"] == 2)
    with torch.inference_mode():
        expected = ref(ids, output_hidden_states=False)
        got = ours(ids, output_hidden_states=False)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)
    rows = torch.arange(3)
    assert torch.equal(got.pooler_output, got.last_hidden_state[rows, torch.tensor([5, 40, 76])])
    assert torch.equal(got[0], got.last_hidden_state) and torch.equal(got[1], got.pooler_output)


def test_tiny_pipeline_prompts_encode_bitwise(tiny_pipe: Any) -> None:
    """The tiny Flux's own encoders and tokenizers, prompts padded as the pipeline pads them."""
    prompts = ["a red fox, snow", "", "two prompts in one batch, longer than sixteen tokens of t5 for sure"]
    t5_ids = tiny_pipe.tokenizer_2(prompts, padding="max_length", max_length=16, truncation=True,
                                   return_tensors="pt").input_ids
    clip_ids = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    t5, clip = _ours_like(tiny_pipe.text_encoder_2), _ours_like(tiny_pipe.text_encoder)
    with torch.inference_mode():
        assert torch.equal(t5(t5_ids, output_hidden_states=False)[0],
                           tiny_pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0])
        assert torch.equal(clip(clip_ids, output_hidden_states=False).pooler_output,
                           tiny_pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output)


def test_attention_masks_and_hidden_states_match() -> None:
    """Options beyond Flux's call: a padding ``attention_mask`` (SDPA's boolean mask path) and
    ``output_hidden_states=True`` (T5: the last one is the final normed state; CLIP: before it)."""
    t5_ref, clip_ref = _hf_t5(T5_SMALL, seed=6), _hf_clip(CLIP_SMALL, seed=7)
    t5, clip = _ours_like(t5_ref), _ours_like(clip_ref)
    t5_ids = _t5_ids(T5_SMALL["vocab_size"], 20)
    clip_ids = _clip_ids(CLIP_SMALL["vocab_size"], 1, 1, False)
    clip_mask = torch.ones_like(clip_ids)
    clip_mask[0, 6:] = 0
    clip_mask[1, 41:] = 0
    with torch.inference_mode():
        assert torch.equal(t5(t5_ids, attention_mask=(t5_ids != 0).long())[0],
                           t5_ref(t5_ids, attention_mask=(t5_ids != 0).long())[0])
        assert not torch.equal(t5(t5_ids, attention_mask=(t5_ids != 0).long())[0], t5(t5_ids)[0])
        got, expected = clip(clip_ids, attention_mask=clip_mask), clip_ref(clip_ids, attention_mask=clip_mask)
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(got.pooler_output, expected.pooler_output)
        for ours, ref, ids in ((t5, t5_ref, t5_ids), (clip, clip_ref, clip_ids)):
            hs, ref_hs = ours(ids, output_hidden_states=True).hidden_states, ref(ids, output_hidden_states=True).hidden_states
            assert hs is not None and len(hs) == len(ref_hs) == 3
            assert all(torch.equal(a, b) for a, b in zip(hs, ref_hs, strict=True))
        assert t5(t5_ids, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers(dtype: torch.dtype) -> None:
    """bf16 / fp16 weights (how Flux runs): T5's float32 RMS-norm statistics and half casts, CLIP's
    SDPA in half. Equal bit for bit here too (tolerance 0)."""
    for ref in (_hf_t5(T5_SMALL, seed=8), _hf_clip(CLIP_SMALL, seed=9)):
        ours = _ours_like(ref)
        ref.to(dtype)
        ours.to(dtype)
        is_t5 = isinstance(ours, T5Encoder)
        ids = _t5_ids(T5_SMALL["vocab_size"], 24) if is_t5 else _clip_ids(CLIP_SMALL["vocab_size"], 1, 1, False)
        with torch.inference_mode():
            expected, got = ref(ids), ours(ids)
        assert got[0].dtype == dtype
        assert torch.equal(got[0], expected[0])
        if not is_t5:
            assert torch.equal(got.pooler_output, expected.pooler_output)


def test_t5_fp16_overflow_is_clamped_as_transformers() -> None:
    """T5's fp16 guard: activations that overflow fp16 are clamped (1000 below the maximum once an
    inf appeared) instead of turning into inf / NaN."""
    ref = _hf_t5(T5_SMALL, seed=10)
    with torch.no_grad():
        for block in ref.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(3e4)
    ours = _ours_like(ref)
    ref.half()
    ours.half()
    ids = _t5_ids(T5_SMALL["vocab_size"], 16)
    with torch.inference_mode():
        expected, got = ref(ids)[0], ours(ids)[0]
        # Without the clamp the first block's output overflows.
        emb = ours.shared(ids)
        block0 = ours.encoder.block[0]
        h, _ = block0.layer[0](emb)
        unclamped = h + block0.layer[-1].DenseReluDense(block0.layer[-1].layer_norm(h))
    assert torch.isinf(unclamped).any()
    assert torch.isfinite(got).all() and torch.equal(got, expected)


# ----------------------------------------------------------------------------- meta + state dicts


def test_meta_construction_and_assign_loading_give_the_same_outputs() -> None:
    """The loader's path: build on the meta device, ``load_state_dict(sd, strict=True,
    assign=True)``; nothing may stay on meta (CLIP computes its positions, it has no buffer)."""
    for ref in (_hf_t5(T5_SMALL, seed=11), _hf_clip(CLIP_SMALL, seed=12)):
        cls = T5Encoder if ref.__class__.__name__ == "T5EncoderModel" else CLIPTextEncoder
        with torch.device("meta"):
            ours = cls.from_config(ref.config.to_dict())
        assert all(p.is_meta for p in ours.parameters())
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        ours.load_state_dict(sd, strict=True, assign=True)
        ours.eval()
        assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
        assert ours.device == torch.device("cpu")
        is_t5 = cls is T5Encoder
        ids = _t5_ids(T5_SMALL["vocab_size"], 16) if is_t5 else _clip_ids(CLIP_SMALL["vocab_size"], 1, 1, False)
        with torch.inference_mode():
            assert torch.equal(ours(ids)[0], ref(ids)[0])
            if not is_t5:
                assert torch.equal(ours(ids).pooler_output, ref(ids).pooler_output)


def test_state_dicts_as_saved_on_disk_load_strictly() -> None:
    """transformers 5 saves T5 with ``shared.weight`` only (tied); CLIP files from transformers 4,
    FLUX.1-dev and ComfyUI carry ``text_model.*``. Both load with strict=True (the embedding tied);
    a key the model does not have is still an error."""
    t5_ref, clip_ref = _hf_t5(T5_SMALL, seed=13), _hf_clip(CLIP_SMALL, seed=14)
    with torch.device("meta"):
        t5 = T5Encoder.from_config(t5_ref.config.to_dict())
        clip = CLIPTextEncoder.from_config(clip_ref.config.to_dict())
    t5_sd = {k: v for k, v in t5_ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    t5.load_state_dict(t5_sd, strict=True, assign=True)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight and not t5.shared.weight.is_meta
    clip.load_state_dict({"text_model." + k: v for k, v in clip_ref.state_dict().items()}, strict=True, assign=True)
    ids = _clip_ids(CLIP_SMALL["vocab_size"], 1, 1, False)
    with torch.inference_mode():
        assert torch.equal(clip(ids).pooler_output, clip_ref(ids).pooler_output)
        t5_ids = _t5_ids(T5_SMALL["vocab_size"], 16)
        assert torch.equal(t5.eval()(t5_ids)[0], t5_ref(t5_ids)[0])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        CLIPTextEncoder.from_config(CLIP_SMALL).load_state_dict({**clip_ref.state_dict(), "text_projection.weight":
                                                                torch.zeros(32, 32)}, strict=True)


def test_configs_are_validated_like_transformers() -> None:
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Encoder.from_config({**T5_SMALL, "feed_forward_proj": "gated-gelu-x"})
    with pytest.raises(ValueError, match="activation"):
        CLIPTextEncoder.from_config({**CLIP_SMALL, "hidden_act": "no_such_act"})
    with pytest.raises(ValueError, match="multiple"):
        CLIPTextEncoder.from_config({**CLIP_SMALL, "num_attention_heads": 5})
    from transformers import T5Config

    cfg = T5Encoder.from_config({**T5_SMALL, "some_unknown_key": 1}).config
    assert cfg.some_unknown_key == 1 and cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    # As T5Config: dense_act_fn / is_gated_act derive from feed_forward_proj unless config.json gives them.
    given = {**T5_SMALL, "dense_act_fn": "relu"}
    assert T5Encoder.from_config(given).config.dense_act_fn == T5Config(**given).dense_act_fn == "relu"


def test_the_module_imports_no_diffusers_or_transformers() -> None:
    code = ("import sys, fastlora_core.runtime.t5, fastlora_core.runtime.clip; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_embeddings_skip_their_random_initialisation_only_on_the_meta_device() -> None:
    """On a real device our embeddings start as ``nn.Embedding``'s do, draw for draw; on the meta device
    (where the loaders build modules before filling them from the file) they skip the initialisation,
    which there would import the compiler (``test_own_modules``' compile=off process pins that)."""
    from fastlora_core.runtime.base import embedding

    torch.manual_seed(0)
    ours = embedding(100, 8)
    torch.manual_seed(0)
    plain = torch.nn.Embedding(100, 8)
    assert torch.equal(ours.weight, plain.weight)
    with torch.device("meta"):
        on_meta = embedding(100, 8)
    assert on_meta.weight.is_meta and on_meta.weight.shape == (100, 8)
    assert on_meta.weight.dtype == plain.weight.dtype and on_meta.weight.requires_grad
