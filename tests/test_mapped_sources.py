"""A LoRA file read again, unchanged, is recognised by where its bytes come from (Linux), so going back
to a LoRA used before reuses what FastLoRA already converted and staged; anything that could make the
bytes differ (a rewrite, an in-place write) is never taken for the same LoRA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from fastlora_core.lora import mapped
from fastlora_core.lora.cache import LoraCache

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")

H = 8
OUT = {f"transformer_blocks.0.attn.{n}": H for n in ("to_q", "to_k", "to_v")}


def write(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    save_file({"up": torch.randn(3 * H, 4, generator=g), "down": torch.randn(4, H, generator=g)}, str(tmp))
    os.replace(tmp, path)  # how downloaders and trainers replace a file: a new inode


def read(path: Path) -> dict[str, torch.Tensor]:
    """As ComfyUI's ``load_torch_file`` does, under inference mode as ComfyUI runs its nodes."""
    with torch.inference_mode(), safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_the_same_unchanged_file_read_twice_has_the_same_sources(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write(path, 1)
    first, second = read(path), read(path)
    assert first["up"].data_ptr() != second["up"].data_ptr()  # new objects, new mapping
    a, b = mapped.tensor_sources(list(first.values())), mapped.tensor_sources(list(second.values()))
    assert a is not None and a == b
    up = a[list(first).index("up")]
    assert up.file.path == str(path.resolve()) and up.nbytes == 3 * H * 4 * 4 and up.shape == (3 * H, 4)


def test_a_rewritten_file_has_other_sources(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write(path, 1)
    before = mapped.tensor_sources(list(read(path).values()))
    write(path, 2)
    after = mapped.tensor_sources(list(read(path).values()))
    assert before is not None and after is not None and before != after


def test_no_source_for_what_is_not_sure(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"up": torch.randn(64, 1024), "down": torch.randn(64, 1024)}, str(path))  # 256 KiB each
    t = read(path)
    assert mapped.tensor_sources([torch.randn(4, 4)]) is None  # not a mapped file
    assert mapped.tensor_sources([t["up"].t()]) is None  # not contiguous
    assert mapped.tensor_sources([t["up"], t["down"]]) is not None
    with torch.inference_mode():
        t["up"][-1, -1] += 1.0  # written in place: a private copy of its page, no version counter
    assert mapped.tensor_sources([t["up"]]) is None
    assert mapped.tensor_sources([t["down"][1:]]) is not None  # its pages are still the file's


def test_going_back_to_a_file_reuses_its_in_memory_lora(tmp_path: Path) -> None:
    """ComfyUI's LoRA node reads the file anew each time the user picks it: A, B, then A again must
    give A's cache path (no second conversion or staging), and a rewrite of A a new one."""
    from fastlora_core.lora.bfl import BflDelta
    from nodes import model_lora

    paths = {n: tmp_path / f"{n}.safetensors" for n in ("a", "b")}
    write(paths["a"], 1)
    write(paths["b"], 2)
    cache, memory = LoraCache(), model_lora.InMemoryLoras()

    def group(name: str) -> model_lora.PatchGroup:
        t = read(paths[name])
        return model_lora.PatchGroup.of({}, 1.0, (BflDelta("double_blocks.0.img_attn.qkv", t["up"], t["down"], 0.25),),
                                        0, OUT)

    a1 = memory.path_for(group("a"), cache)
    b = memory.path_for(group("b"), cache)
    a2 = memory.path_for(group("a"), cache)
    assert a1 == a2 and a1 != b
    write(paths["a"], 3)
    a3 = memory.path_for(group("a"), cache)
    assert a3 not in (a1, b)
    got = cache.get(a3)[1].transformer["transformer_blocks.0.attn.to_q"].delta()
    t = read(paths["a"])
    assert torch.equal(got, 0.25 * t["up"][:H] @ t["down"])


def test_the_same_bytes_on_other_layers_are_another_lora(tmp_path: Path) -> None:
    """A source identifies bytes, not where they go: the same tensors given to other rows of the
    weight (another key mapping) must not be taken for the LoRA already converted."""
    from fastlora_core.lora.bfl import BflDelta
    from nodes import model_lora

    path = tmp_path / "two.safetensors"
    g = torch.Generator().manual_seed(4)
    save_file({n: torch.randn(*shape, generator=g) for n, shape in
               (("up1", (H, 4)), ("down1", (4, H)), ("up2", (H, 4)), ("down2", (4, H)))}, str(path))
    cache, memory = LoraCache(), model_lora.InMemoryLoras()

    def group(swapped: bool) -> model_lora.PatchGroup:
        t = read(path)
        rows = [(H, H), (0, H)] if swapped else [(0, H), (H, H)]
        return model_lora.PatchGroup.of({}, 1.0, (
            BflDelta("double_blocks.0.img_attn.qkv", t["up1"], t["down1"], 1.0, rows[0]),
            BflDelta("double_blocks.0.img_attn.qkv", t["up2"], t["down2"], 1.0, rows[1])), 0, OUT)

    straight = memory.path_for(group(False), cache)
    assert memory.path_for(group(False), cache) == straight  # read again: the same LoRA
    assert memory.path_for(group(True), cache) != straight
