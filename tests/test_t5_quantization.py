"""``t5_quantization`` (the default on 24 GB cards is NF4): a quantised T5 must still compute T5.

The tiny test pipeline's T5 is too narrow for bitsandbytes but for its ``wo`` layers, which stay
unquantised, so these tests build a T5 whose widths are multiples of 64, both FastLoRA's own encoder and transformers'
``T5EncoderModel`` with the same weights, and quantise them with the engine's ``quantize_t5``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastlora_core.optimize import T5_KEEP_UNQUANTISED, quantize_t5

bnb = pytest.importorskip("bitsandbytes")

CONFIG = {"vocab_size": 256, "d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_heads": 4,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0}


def _encoders() -> dict[str, nn.Module]:
    """transformers' T5 encoder with random weights and FastLoRA's own with the same weights, bf16."""
    from transformers import T5Config, T5EncoderModel

    from fastlora_core.runtime.t5 import T5Encoder

    torch.manual_seed(0)
    theirs = T5EncoderModel(T5Config(**CONFIG)).eval()
    ours = T5Encoder.from_config(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict())
    return {"transformers": theirs.to(torch.bfloat16), "own": ours.to(torch.bfloat16)}


def _dequantised_copy(quantised: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference`` with each of ``quantised``'s NF4 layers' weights replaced by its dequantised
    values: what the quantised encoder must compute, up to matmul rounding."""
    copy_ = copy.deepcopy(reference)
    layers = dict(copy_.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            layers[name].weight.data.copy_(weight.to(layers[name].weight.dtype))
    return copy_


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _quantised(which: str, mode: str, device: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(the unquantised encoder, a copy quantised by ``quantize_t5``, token ids), all on ``device``."""
    reference = _encoders()[which].to(device)
    quantised = copy.deepcopy(reference)
    quantize_t5(quantised, mode, torch.bfloat16, torch.device(device))
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    return reference, quantised, ids


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["own", "transformers"])
def test_nf4_t5_computes_what_its_dequantised_weights_compute(which: str, device: str) -> None:
    reference, quantised, ids = _quantised(which, "nf4", device)
    linears = [(name, type(m)) for name, m in quantised.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7, linears  # per block: q, k, v, o, wi_0, wi_1, wo
    for name, kind in linears:
        kept = name.rsplit(".", 1)[-1] in T5_KEEP_UNQUANTISED
        assert kind is (nn.Linear if kept else bnb.nn.Linear4bit), (name, kind)
    with torch.no_grad():
        got = quantised(ids)[0].float()
        want = _dequantised_copy(quantised, reference)(ids)[0].float()
        plain = reference(ids)[0].float()
    # Same weights, different kernels: bf16 rounding only. (An NF4 ``wo`` had its input cast to
    # uint8 by T5's feed-forward: a relative error of ~1, the text embeddings noise.)
    assert _relative(got, want) < 0.02
    # And NF4 itself stays close to the unquantised encoder (random weights: ~0.1).
    assert _relative(got, plain) < 0.25


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["own", "transformers"])
def test_int8_t5_stays_close_to_the_unquantised_encoder(which: str, device: str) -> None:
    reference, quantised, ids = _quantised(which, "int8", device)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in quantised.modules())
    with torch.no_grad():
        assert _relative(quantised(ids)[0].float(), reference(ids)[0].float()) < 0.05  # random weights: ~0.012 (CPU)


def test_int8_t5_uses_transformers_outlier_threshold() -> None:
    """``t5_quantization=int8`` computes what transformers' ``load_in_8bit=True`` computes: the same
    LLM.int8() outlier threshold on every int8 layer (bitsandbytes' own default, 0, has none)."""
    from transformers import BitsAndBytesConfig

    _, quantised, _ = _quantised("own", "int8", "cpu")
    thresholds = {m.state.threshold for m in quantised.modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert thresholds == {BitsAndBytesConfig(load_in_8bit=True).llm_int8_threshold}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantises activations on the GPU only")
def test_int8_t5_layer_keeps_an_outlier_column_exact_enough() -> None:
    """An activation column far above the others (as in large transformers) runs in 16-bit beside the
    int8 product, so the other columns keep their precision. With every column in int8 (threshold 0)
    the outlier sets the row's step: the relative error grows several-fold."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(256, 256)).to(torch.bfloat16)
    reference = copy.deepcopy(encoder).cuda()
    quantize_t5(encoder, "int8", torch.bfloat16, torch.device("cuda"))
    assert isinstance(encoder[0], bnb.nn.Linear8bitLt)
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    x[:, 7] *= 60.0  # one outlier feature, ~60x the others (> the threshold of 6)
    with torch.no_grad():
        error = _relative(encoder(x).float(), reference(x).float())
    assert error < 0.02, error
