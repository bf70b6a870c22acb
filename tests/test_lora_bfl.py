"""LoRA deltas in BFL layout (what ComfyUI's LoRA loaders produce for FastLoRA's MODEL) map exactly
onto the diffusers layers the engine swaps, and in-memory LoRAs live in the engine's LoRA cache."""

from __future__ import annotations

import pytest
import torch

from fastlora_core.errors import LoraFitError, LoraFormatError
from fastlora_core.lora.bfl import BflDelta, lora_from_bfl
from fastlora_core.lora.cache import LoraCache

H = 8  # hidden size of this toy layout; MLP 4 x H
OUT = {
    **{f"transformer_blocks.0.attn.{n}": H for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
    **{f"single_transformer_blocks.0.attn.{n}": H for n in ("to_q", "to_k", "to_v")},
    "single_transformer_blocks.0.proj_mlp": 4 * H,
    "norm_out.linear": 2 * H,
    "x_embedder": H,
}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_delta(d: BflDelta, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, d.down.shape[1])
    start, length = d.rows or (0, rows)
    out[start:start + length] = d.scale * d.up @ d.down
    return out


def test_fused_weights_split_by_rows_exactly() -> None:
    qkv = BflDelta("double_blocks.0.img_attn.qkv", rand(3 * H, 4, seed=1), rand(4, H, seed=2), 0.5)
    linear1 = BflDelta("single_blocks.0.linear1", rand(7 * H, 2, seed=3), rand(2, H, seed=4), 2.0)
    lora = lora_from_bfl([qkv, linear1], "test", OUT)
    want = full_delta(qkv, 3 * H)
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(lora.transformer[f"transformer_blocks.0.attn.{n}"].delta(), want[i * H:(i + 1) * H],
                                   rtol=0, atol=1e-6)
    want1 = full_delta(linear1, 7 * H)
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    bounds = [0, H, 2 * H, 3 * H, 7 * H]
    for n, lo, hi in zip(parts, bounds, bounds[1:]):
        torch.testing.assert_close(lora.transformer[f"single_transformer_blocks.0.{n}"].delta(), want1[lo:hi],
                                   rtol=0, atol=1e-6)


def test_row_slices_land_on_their_layer_only() -> None:
    """diffusers-format files address ``to_k`` as rows H..2H of ``qkv``; a slice across two layers
    gives each its rows and zeros elsewhere."""
    k_only = BflDelta("double_blocks.0.txt_attn.qkv", rand(H, 3, seed=5), rand(3, H, seed=6), 1.0, rows=(H, H))
    across = BflDelta("double_blocks.0.img_attn.qkv", rand(H, 2, seed=7), rand(2, H, seed=8), 1.0, rows=(H // 2, H))
    lora = lora_from_bfl([k_only, across], "test", OUT)
    assert set(lora.transformer) == {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_q",
                                     "transformer_blocks.0.attn.to_k"}
    torch.testing.assert_close(lora.transformer["transformer_blocks.0.attn.add_k_proj"].delta(),
                               k_only.up @ k_only.down, rtol=0, atol=1e-6)
    want = full_delta(across, 3 * H)
    torch.testing.assert_close(lora.transformer["transformer_blocks.0.attn.to_q"].delta(), want[:H], rtol=0, atol=1e-6)
    torch.testing.assert_close(lora.transformer["transformer_blocks.0.attn.to_k"].delta(), want[H:2 * H], rtol=0,
                               atol=1e-6)


def test_final_adaln_halves_are_swapped_to_diffusers_order() -> None:
    d = BflDelta("final_layer.adaLN_modulation.1", rand(2 * H, 2, seed=9), rand(2, H, seed=10), 1.0)
    got = lora_from_bfl([d], "test", OUT).transformer["norm_out.linear"].delta()
    want = d.up @ d.down  # BFL rows (shift, scale) -> diffusers (scale, shift)
    torch.testing.assert_close(got, torch.cat([want[H:], want[:H]]), rtol=0, atol=1e-6)


def test_unknown_layers_and_wrong_shapes_are_refused_with_the_label() -> None:
    with pytest.raises(LoraFitError, match="LoRA #2.*double_blocks.0.img_attn.norm"):
        lora_from_bfl([BflDelta("double_blocks.0.img_attn.norm", rand(H, 1, seed=1), rand(1, H, seed=1))], "LoRA #2", OUT)
    with pytest.raises(LoraFitError, match="does not fit"):
        lora_from_bfl([BflDelta("img_in", rand(H + 1, 1, seed=1), rand(1, H, seed=1))], "LoRA #1", OUT)


def test_in_memory_loras_get_their_own_paths_and_a_clear_error_once_evicted() -> None:
    a = lora_from_bfl([BflDelta("img_in", rand(H, 2, seed=1), rand(2, H, seed=2))], "a", OUT)
    cache = LoraCache(max_bytes=a.nbytes() + 1)
    pa = cache.put(a)
    key, got, hit = cache.lookup(pa)
    assert got is a and hit and key.path == pa and cache.has(pa)
    pb = cache.put(a)  # a second put is a new identity, even for the same object
    assert pb != pa and not cache.has(pa)  # the budget holds one: the older one went
    with pytest.raises(LoraFormatError, match="no longer cached"):
        cache.lookup(pa)


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_non_finite_deltas_are_refused_with_the_label(value: float, word: str) -> None:
    """A LoRA reaching the MODEL path through ComfyUI's loaders is checked like a file: NaN or
    infinite values would make every image black. It comes out of the conversion marked unchecked
    (the engine checks its staged copy) and the check names the loader's label and the layer."""
    from fastlora_core.lora.formats import check_values

    down = rand(2, H, seed=2)
    down[1, 3] = value
    bad = lora_from_bfl([BflDelta("img_in", rand(H, 2, seed=1), down)], "LoRA #3 on this MODEL", OUT)
    assert not bad.values_checked
    with pytest.raises(LoraFormatError, match=f"LoRA #3 on this MODEL: x_embedder.down holds 1 {word}"):
        check_values(bad)
    check_values(lora_from_bfl([BflDelta("img_in", rand(H, 2, seed=1), rand(2, H, seed=2))], "fine", OUT))
