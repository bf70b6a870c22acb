"""LyCORIS LoKr / LoHa, DoRA and full-delta ("diff") files: merged exactly by ``fused``, refused
with advice by ``adapter``.

Independent references: the ``lycoris-lora`` package (what SimpleTuner and LyCORIS' own scripts
train with) builds each file on the tiny transformer and gives every layer's trained weight as its
module's *forward* computes it (on an identity input); PEFT does the same for PEFT-saved DoRA /
LoKr / LoHa (its own ``merge``). Our reader and merge never see those weights. At strength ``s``
the expected weight is ``W + s * (W1 - W)`` (``W1``: the reference weight at strength 1; the
strength convention of ComfyUI's loader, see lora/lycoris.py).

Tolerances: float32 on the CPU. Per-layer weights within 2e-5 absolute (weights and deltas are
~0.01-1; float32 reassociation gives ~1e-7); images within 1e-4 (observed ~1e-6), while every
file changes the image by more than 1e-2 (checked).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastlora_core.engine import FluxEngine, run_pipeline
from fastlora_core.errors import LoraFitError
from fastlora_core.lora.formats import read_lora
from fastlora_core.lora.types import DenseLayer
from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (the test extra) is the reference")

CPU = EngineOptions(dtype="float32", device="cpu", compile="off", max_rank=32)
W_TOL = 2e-5
IMG_TOL = 1e-4
STRENGTHS = (1.0, 0.5, -0.7)


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _trained_weight(module: torch.nn.Module, linear: torch.nn.Linear) -> torch.Tensor:
    """The weight a LyCORIS / PEFT-wrapped linear layer computes with: its forward on an identity."""
    with torch.no_grad():
        y = module(torch.eye(linear.in_features))
    if linear.bias is not None:
        y = y - linear.bias
    return y.T.contiguous()


def _randomise(params: list[tuple[str, torch.nn.Parameter]], seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "dora_scale" in name or "magnitude" in name:  # trained magnitudes: the norms, perturbed
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif not name.endswith("alpha"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclasses.dataclass
class RefFile:
    path: str
    trained: dict[str, torch.Tensor]  # diffusers module name -> weight at strength 1

    def expected(self, original: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
        return {n: original[n] + strength * (w - original[n]) for n, w in self.trained.items()}


def lycoris_file(path: Path, transformer: torch.nn.Module, algo: str, seed: int, std: float,
                 dim: int = 4, alpha: float = 2.0, dtype: torch.dtype | None = None, **kwargs: object) -> RefFile:
    """A LyCORIS network on a copy of ``transformer`` (``create_lycoris``, as SimpleTuner trains
    Flux), random factors, saved with LyCORIS' own ``save_weights`` (``lycoris_<module>`` keys)."""
    from lycoris import create_lycoris

    model = copy.deepcopy(transformer)
    names = {"lycoris_" + n.replace(".", "_"): n for n in _linears(model)}
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    _randomise(list(net.named_parameters()), seed, std)
    trained = {names[lm.lora_name]: _trained_weight(lm, lm.org_module[0]) for lm in net.loras}
    net.save_weights(str(path), dtype, {})
    return RefFile(str(path), trained)


CONFIGS = {
    "lokr": dict(algo="lokr", factor=4, std=0.2),
    "lokr-decompose-both": dict(algo="lokr", factor=4, decompose_both=True, std=0.3, dim=2),
    "lokr-full-matrix": dict(algo="lokr", factor=8, full_matrix=True, std=0.1),
    "loha": dict(algo="loha", std=0.4),
    "lora-dora": dict(algo="lora", dora_wd=True, std=0.2, alpha=4.0),
    "lora-dora-per-input": dict(algo="lora", dora_wd=True, wd_on_output=False, std=0.2, alpha=4.0),
    # LoKr / LoHa + DoRA at alpha == rank: lycoris-lora 4.1.3's DoRA path squares alpha / rank.
    "lokr-dora": dict(algo="lokr", factor=4, dora_wd=True, std=0.2, alpha=4.0),
    "loha-dora": dict(algo="loha", dora_wd=True, std=0.4, alpha=4.0),
}


def _make(tmp_path: Path, transformer: torch.nn.Module, config: str, seed: int = 3) -> RefFile:
    kw = dict(CONFIGS[config])
    return lycoris_file(tmp_path / f"{config}.safetensors", transformer, seed=seed, **kw)  # type: ignore[arg-type]


def _weights(engine: FluxEngine) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in _linears(engine.transformer).items()}


def _assert_weights(engine: FluxEngine, expected: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                    label: str) -> None:
    now = _weights(engine)
    for name, want in expected.items():
        diff = float((now[name] - want).detach().abs().max())
        assert diff <= W_TOL, f"{label}: {name} differs from the reference by {diff}"
    for name in set(now) - set(expected):
        assert torch.equal(now[name], original[name]), f"{label}: untouched layer {name} changed"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_lycoris_files_merge_to_the_trained_weights(
        tiny_source: ModelSource, tmp_path: Path, config: str) -> None:
    engine = FluxEngine(tiny_source, CPU)
    original = _weights(engine)
    ref = _make(tmp_path, engine.transformer, config)
    lora = read_lora(ref.path)
    assert set(lora.transformer) == set(ref.trained)
    assert all(isinstance(layer, DenseLayer) for layer in lora.transformer.values())
    assert max(float((w - original[n]).abs().max()) for n, w in ref.trained.items()) > 1e-2
    for s in STRENGTHS:
        engine.apply(LoraStack.of((ref.path, s)))
        _assert_weights(engine, ref.expected(original, s), original, f"{config} at {s}")
    engine.apply(LoraStack())
    assert all(torch.equal(w, original[n]) for n, w in _weights(engine).items()), "not restored exactly"


def test_bf16_lokr_file_reads_as_stored(tiny_source: ModelSource, tmp_path: Path) -> None:
    """LyCORIS saves bf16 factors; the delta is rebuilt from exactly those values (in float32)."""
    engine = FluxEngine(tiny_source, CPU)
    ref = lycoris_file(tmp_path / "bf16.safetensors", engine.transformer, "lokr", seed=4, std=0.2, factor=4,
                       dtype=torch.bfloat16)
    lora = read_lora(ref.path)
    layer = lora.transformer["transformer_blocks.0.attn.to_q"]
    assert isinstance(layer, DenseLayer) and all(t.dtype == torch.bfloat16 for t in layer.factors.values())
    original = _weights(engine)
    engine.apply(LoraStack.of((ref.path, 1.0)))
    # The reference used the float32 factors; bf16 storage rounds them (relative 2^-8).
    for name, want in ref.trained.items():
        delta = want - original[name]
        err = float((_weights(engine)[name] - want).abs().max())
        assert err <= 0.02 * float(delta.abs().max()) + W_TOL, name


# --------------------------------------------------------------------------------------------------
# BFL / kohya layout: fused qkv / linear1 and the swapped final-layer halves
# --------------------------------------------------------------------------------------------------

_FUSED = {  # BFL module -> diffusers modules whose weights it concatenates (rows), in order
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
}


def bfl_file(path: Path, transformer: torch.nn.Module, module_cls: type, seed: int, std: float,
             **kwargs: object) -> RefFile:
    """LyCORIS modules on BFL's fused layers (built from the diffusers weights), saved under kohya
    ``lora_unet_<BFL module>`` names: what kohya / LyCORIS scripts write for a BFL checkpoint."""
    lin = _linears(transformer)
    sd: dict[str, torch.Tensor] = {}
    trained: dict[str, torch.Tensor] = {}
    for i, (bfl, parts) in enumerate(_FUSED.items()):
        w = torch.cat([lin[p].weight.detach() for p in parts])
        b = torch.cat([lin[p].bias.detach() for p in parts])
        if bfl.startswith("final_layer"):  # BFL holds (shift, scale); diffusers (scale, shift)
            half = w.shape[0] // 2
            w, b = torch.cat([w[half:], w[:half]]), torch.cat([b[half:], b[:half]])
        fused = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            fused.weight.copy_(w)
            fused.bias.copy_(b)
        module = module_cls("lora_unet_" + bfl.replace(".", "_"), fused, 1.0, 4, 2.0, **kwargs)
        module.apply_to()
        _randomise(list(module.named_parameters()), seed + i, std)
        w1 = _trained_weight(module, fused)
        if bfl.startswith("final_layer"):
            half = w1.shape[0] // 2
            w1 = torch.cat([w1[half:], w1[:half]])
        rows = 0
        for p in parts:
            n = lin[p].weight.shape[0]
            trained[p] = w1[rows:rows + n]
            rows += n
        for key, value in module.state_dict().items():
            if key.split(".")[0] in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                     "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "dora_scale",
                                     "lora_up", "lora_down"):
                sd[f"{module.lora_name}.{key}"] = value.detach().clone().contiguous()
    save_file(sd, str(path))
    return RefFile(str(path), trained)


@pytest.mark.parametrize("kind", ["lokr", "loha", "lora-dora", "lokr-dora"])
def test_bfl_fused_layers_are_split_by_rows(tiny_source: ModelSource, tmp_path: Path, kind: str) -> None:
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls, kw = {"lokr": (LokrModule, {"factor": 4}), "loha": (LohaModule, {}),
               "lora-dora": (LoConModule, {"weight_decompose": True}),
               "lokr-dora": (LokrModule, {"factor": 4, "weight_decompose": True})}[kind]
    engine = FluxEngine(tiny_source, CPU)
    original = _weights(engine)
    ref = bfl_file(tmp_path / f"bfl-{kind}.safetensors", engine.transformer, cls, seed=8, std=0.3, **kw)
    assert read_lora(ref.path).source_format == "kohya"
    for s in STRENGTHS:
        engine.apply(LoraStack.of((ref.path, s)))
        _assert_weights(engine, ref.expected(original, s), original, f"{kind} at {s}")


# --------------------------------------------------------------------------------------------------
# PEFT-saved DoRA, LoKr and LoHa
# --------------------------------------------------------------------------------------------------


def peft_file(path: Path, transformer: torch.nn.Module, config: object, prefix: str, seed: int,
              std: float, metadata: dict[str, str] | None = None) -> RefFile:
    """A PEFT adapter injected into a copy of ``transformer``, random weights, saved with PEFT's own
    ``get_peft_model_state_dict``; the trained weights from PEFT's ``merge``."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    model = copy.deepcopy(transformer)
    inject_adapter_in_model(config, model)  # type: ignore[arg-type]
    _randomise([(n, p) for n, p in model.named_parameters() if "base_layer" not in n], seed, std)
    sd = get_peft_model_state_dict(model)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    trained = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            trained[name] = module.base_layer.weight.detach().clone()
    return RefFile(str(path), trained)


_TARGETS = ["attn.to_q", "attn.to_out.0", "ff.net.2", "proj_mlp", "norm1.linear", "x_embedder"]


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_peft_saved_adapters(tiny_source: ModelSource, tmp_path: Path, kind: str) -> None:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    engine = FluxEngine(tiny_source, CPU)
    original = _weights(engine)
    # diffusers' save_lora_weights keeps the LoRA alpha in the file's metadata
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.use_dora": True})}
    config, prefix, std = {
        "dora": (LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=_TARGETS), "transformer.", 0.2),
        # PEFT keeps alpha / r in adapter_config.json, not in the weights: files read at scale 1 = alpha == r
        "lokr": (LoKrConfig(r=4, alpha=4, target_modules=_TARGETS, decompose_both=True), "base_model.model.", 0.4),
        "loha": (LoHaConfig(r=4, alpha=4, target_modules=_TARGETS), "base_model.model.", 0.5),
    }[kind]
    ref = peft_file(tmp_path / f"peft-{kind}.safetensors", engine.transformer, config, prefix, seed=9, std=std,
                    metadata=meta if kind == "dora" else None)
    assert len(ref.trained) >= len(_TARGETS)
    assert max(float((w - original[n]).abs().max()) for n, w in ref.trained.items()) > 1e-2
    for s in STRENGTHS:
        engine.apply(LoraStack.of((ref.path, s)))
        _assert_weights(engine, ref.expected(original, s), original, f"PEFT {kind} at {s}")


# --------------------------------------------------------------------------------------------------
# Full deltas (diff / diff_b)
# --------------------------------------------------------------------------------------------------


def test_full_diff_file_changes_weights_and_biases(tiny_source: ModelSource, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, CPU)
    lin = _linears(engine.transformer)
    original = _weights(engine)
    original_bias = {n: m.bias.detach().clone() for n, m in lin.items() if m.bias is not None}
    g = torch.Generator().manual_seed(12)
    sd: dict[str, torch.Tensor] = {}
    want_w: dict[str, torch.Tensor] = {}
    want_b: dict[str, torch.Tensor] = {}
    for name in ("transformer_blocks.0.attn.to_out.0", "proj_out", "context_embedder"):
        key = "diffusion_model." + {"transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
                                    "proj_out": "final_layer.linear", "context_embedder": "txt_in"}[name]
        want_w[name] = torch.randn(lin[name].weight.shape, generator=g) * 0.05
        want_b[name] = torch.randn(lin[name].bias.shape, generator=g) * 0.05
        sd[key + ".diff"], sd[key + ".diff_b"] = want_w[name], want_b[name]
    # fused qkv (weight and bias rows split) and a bias-only entry
    qkv = ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.0.attn.add_v_proj"]
    for n in qkv:
        want_w[n] = torch.randn(lin[n].weight.shape, generator=g) * 0.05
        want_b[n] = torch.randn(lin[n].bias.shape, generator=g) * 0.05
    sd["diffusion_model.double_blocks.0.txt_attn.qkv.diff"] = torch.cat([want_w[n] for n in qkv])
    sd["diffusion_model.double_blocks.0.txt_attn.qkv.diff_b"] = torch.cat([want_b[n] for n in qkv])
    want_b["x_embedder"] = torch.randn(lin["x_embedder"].bias.shape, generator=g) * 0.05
    sd["diffusion_model.img_in.diff_b"] = want_b["x_embedder"]
    sd["diffusion_model.txt_in.norm.diff"] = torch.zeros(4)  # all zero: skipped
    path = tmp_path / "full-diff.safetensors"
    save_file(sd, str(path))
    for s in STRENGTHS:
        engine.apply(LoraStack.of((str(path), s)))
        _assert_weights(engine, {n: original[n] + s * d for n, d in want_w.items()}, original, f"diff at {s}")
        for n, b in original_bias.items():
            got = lin[n].bias.detach()
            if n in want_b:
                assert float((got - (b + s * want_b[n])).abs().max()) <= W_TOL, n
            else:
                assert torch.equal(got, b), n
    engine.apply(LoraStack())
    assert all(torch.equal(lin[n].bias, b) for n, b in original_bias.items()), "biases not restored exactly"


def test_staged_copies_of_dense_layers(tiny_source: ModelSource, tmp_path: Path) -> None:
    """The engine's GPU staging (``DeviceLoraCache``) copies a LoRA with ``NormalizedLora.to`` and
    budgets it with ``nbytes``: a dense layer's factors and bias delta move to the engine's dtype
    (same values), DoRA's magnitude stays float32 (it divides a norm), and every tensor is counted."""
    engine = FluxEngine(tiny_source, CPU)
    lin = _linears(engine.transformer)
    dora = read_lora(_make(tmp_path, engine.transformer, "lokr-dora").path)
    diff = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.img_in.diff": torch.randn(lin["x_embedder"].weight.shape),
               "diffusion_model.img_in.diff_b": torch.randn(lin["x_embedder"].bias.shape)}, str(diff))
    for lora in (dora, read_lora(str(diff))):
        staged = lora.to("cpu", torch.float16)
        tensors = []
        for name, layer in staged.transformer.items():
            src = lora.transformer[name]
            assert isinstance(layer, DenseLayer) and isinstance(src, DenseLayer)
            assert (layer.kind, layer.scale, layer.shape, layer.rows) == (src.kind, src.scale, src.shape, src.rows)
            for k, t in layer.factors.items():
                assert t.dtype == torch.float16 and torch.equal(t, src.factors[k].to(torch.float16)), (name, k)
            if src.magnitude is not None:
                assert layer.magnitude is not None and layer.magnitude.dtype == torch.float32
                assert torch.equal(layer.magnitude, src.magnitude)
            if src.bias is not None:
                assert layer.bias is not None and torch.equal(layer.bias, src.bias.to(torch.float16))
            tensors += [*layer.factors.values(), *(t for t in (layer.magnitude, layer.bias) if t is not None)]
        assert staged.nbytes() == sum(t.numel() * t.element_size() for t in tensors) > 0
    assert any(layer.magnitude is not None for layer in dora.transformer.values())


# --------------------------------------------------------------------------------------------------
# The compiled engine: images, stacks, zero recompiles, refusals
# --------------------------------------------------------------------------------------------------


def _reference_image(pipe, weights: dict[str, torch.Tensor], request: GenerateRequest) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The uncompiled reference pipeline (separately loaded, no LoRA code) holding exactly ``weights``
    (every linear layer of the transformer)."""
    lin = _linears(pipe.transformer)
    assert set(weights) == set(lin)
    with torch.no_grad():
        for n, w in weights.items():
            lin[n].weight.copy_(w)
    return run_pipeline(pipe, request)


@pytest.mark.slow
def test_compiled_swaps_match_reference_pipelines_with_zero_recompiles(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, compile="regional"))
    original = _weights(engine)
    lokr = _make(tmp_path, engine.transformer, "lokr")
    loha = _make(tmp_path, engine.transformer, "loha", seed=5)
    dora = _make(tmp_path, engine.transformer, "lora-dora", seed=6)
    plain = lycoris_file(tmp_path / "plain-lora.safetensors", engine.transformer, "lora", seed=7, std=0.2)
    assert not any(isinstance(layer, DenseLayer) for layer in read_lora(plain.path).transformer.values())
    base = engine.generate(tiny_request, LoraStack()).images  # compiles here
    files = {"lokr": lokr, "loha": loha, "dora": dora, "plain": plain}
    sequence = [
        (("lokr", 1.0),), (("lokr", 0.5),), (("lokr", -0.7),),
        (("lokr", 1.0), ("plain", 0.8)),  # LoKr + plain LoRA
        (("loha", 1.0),), (("dora", 1.0),), (("dora", -0.7),),
        (("dora", 0.5), ("lokr", 0.5), ("plain", -0.3)),
        (("lokr", 1.0),),  # back: bit for bit
        (),
    ]
    from fastlora_core.loading import load_pipeline

    reference = load_pipeline(tiny_source, torch.float32)
    reference.set_progress_bar_config(disable=True)
    seen: dict[tuple, torch.Tensor] = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for items in sequence:
            stack = LoraStack.of(*((files[n].path, s) for n, s in items))
            result = engine.generate(tiny_request, stack)
            assert result.new_compiles == 0, items
            want = dict(original)
            for n, s in items:
                for layer, w in files[n].trained.items():
                    want[layer] = want[layer] + s * (w - original[layer])
            expected = _reference_image(reference, want, tiny_request)
            diff = float((result.images - expected).abs().max())
            assert diff <= IMG_TOL, f"{items}: max abs diff {diff}"
            if items:
                assert float((expected - base).abs().max()) > 100 * IMG_TOL, f"{items}: no visible effect"
            if items in seen:
                assert torch.equal(seen[items], result.images), f"{items}: A -> B -> A not bit-identical"
            seen[items] = result.images
    assert torch.equal(seen[()], base)
    assert all(torch.equal(w, original[n]) for n, w in _weights(engine).items())


def test_adapter_strategy_refuses_dense_layers_with_advice(
        tiny_source: ModelSource, tiny_loras: dict[str, str], tiny_request: GenerateRequest, tmp_path: Path) -> None:
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, swap_strategy="adapter"))
    lokr = _make(tmp_path, engine.transformer, "lokr")
    dora = _make(tmp_path, engine.transformer, "lora-dora")
    engine.prepare_slot(all_layers=True)
    good = LoraStack.of((tiny_loras["fastlora-tiny-style"], 1.0))
    before = engine.generate(tiny_request, good).images
    for ref, kind in ((lokr, "LoKr"), (dora, "LoRA \\+ DoRA")):
        with pytest.raises(LoraFitError, match=f"{Path(ref.path).name} \\({kind}\\).*swap_strategy=fused"):
            engine.apply(good.plus(LoraStack.of((ref.path, 1.0)).entries[0]))
        assert engine.loaded_stack == good
        assert torch.equal(engine.generate(tiny_request, good).images, before)
        with pytest.raises(LoraFitError, match="swap_strategy=fused"):
            engine.prepare_slot([ref.path])
    assert torch.equal(engine.generate(tiny_request, good).images, before)


def test_quantised_weights_merge_from_the_master_and_restore_exactly(
        tiny_source: ModelSource, tiny_request: GenerateRequest, tmp_path: Path) -> None:
    """int8 weights: LoKr + DoRA are merged against the high-precision master (DoRA's norm too) and
    re-quantised; the result is within one quantisation step of the reference weight, and an
    empty stack restores the original bytes."""
    from fastlora_core.lora.quantized import clone_quantized

    plain = FluxEngine(tiny_source, CPU)
    original = _weights(plain)
    lokr = _make(tmp_path, plain.transformer, "lokr")
    dora = _make(tmp_path, plain.transformer, "lora-dora", seed=6)
    engine = FluxEngine(tiny_source, dataclasses.replace(CPU, quantization="int8_weight_only"))
    modules = dict(engine.transformer.named_modules())
    touched = sorted(set(lokr.trained) | set(dora.trained))
    before = {n: clone_quantized(modules[n].weight, "cpu") for n in touched}
    image = engine.generate(tiny_request).images
    engine.apply(LoraStack.of((lokr.path, 0.5), (dora.path, -0.7)))
    want = dict(original)
    for ref, s in ((lokr, 0.5), (dora, -0.7)):
        for n, w in ref.trained.items():
            want[n] = want[n] + s * (w - original[n])
    for n in touched:
        step = float(want[n].abs().amax() / 127)
        got = modules[n].weight.dequantize()
        assert float((got - want[n]).abs().max()) <= 1.01 * step, n
        if n in dora.trained:
            assert float((want[n] - original[n]).abs().max()) > 3 * step, f"{n}: the merge is not visible in int8"
    engine.apply(LoraStack.of((lokr.path, 0.5)))  # no DoRA in the stack: the merge needs no second float32 copy
    visible = 0
    for n in lokr.trained:
        want_n = original[n] + 0.5 * (lokr.trained[n] - original[n])
        step = float(want_n.abs().amax() / 127)
        assert float((modules[n].weight.dequantize() - want_n).abs().max()) <= 1.01 * step, n
        visible += float((want_n - original[n]).abs().max()) > 3 * step
    assert visible, "the LoKr merge is not visible in int8 on any layer"
    engine.apply(LoraStack())
    for n, saved in before.items():
        assert all(torch.equal(v, saved[k]) for k, v in clone_quantized(modules[n].weight, "cpu").items()), n
    assert torch.equal(engine.generate(tiny_request).images, image)


# --------------------------------------------------------------------------------------------------
# A second reference: ComfyUI's own loader (comfy/lora.py + comfy/weight_adapter), when available
# --------------------------------------------------------------------------------------------------


_COMFY_SCRIPT = """
import sys
from safetensors.torch import load_file, save_file
comfyui_dir, weights_path, out_path, strengths, *lora_paths = sys.argv[1:]
sys.path.insert(0, comfyui_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora
original = load_file(weights_path)
to_load = {"lycoris_" + n.replace(".", "_"): n for n in original}
out = {}
for i, lora_path in enumerate(lora_paths):
    patches = comfy.lora.load_lora(load_file(lora_path), to_load, log_missing=True)
    for s in strengths.split(","):
        for n, a in patches.items():
            out[f"{i}|{s}|{n}"] = a.calculate_weight(original[n].clone(), n, float(s), 1.0, None, lambda w: w)
out = {k: v.contiguous() for k, v in out.items()}
save_file(out, out_path)
"""


def _comfy_merged(comfyui_dir: str, paths: list[str], original: dict[str, torch.Tensor],
                  strengths: tuple[float, ...], tmp_path: Path) -> list[dict[float, dict[str, torch.Tensor]]]:
    """What ComfyUI's LoRA loader makes of the file: ``load_lora`` groups the keys into adapters,
    each adapter's ``calculate_weight`` patches the original weight (float32). Run in a separate
    process: the real ``comfy`` package must not meet the tests' ComfyUI stub.

    Not compared: DoRA with per-output-row norms (LyCORIS' default), for which ComfyUI (checked at
    a125cd84) divides by the norm of the *original* weight rows where LyCORIS' forward and PEFT use
    the merged weight (``weight_decompose`` in comfy/weight_adapter/base.py); we follow the trainers.
    """
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_comfyui_real import _torchvision_pythonpath

    weights, out = tmp_path / "original.safetensors", tmp_path / "comfy.safetensors"
    save_file({n: w.contiguous() for n, w in original.items()}, str(weights))
    # comfy.lora imports comfy.model_base, which imports torchvision: the server tests' shim where no wheel fits
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora" / "comfyui-test"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(_torchvision_pythonpath(cache) + [p for p in [env.get("PYTHONPATH", "")] if p])
    subprocess.run([sys.executable, "-c", _COMFY_SCRIPT, comfyui_dir, str(weights), str(out),
                    ",".join(map(str, strengths)), *paths], check=True, cwd=tmp_path, timeout=300, env=env)
    merged: list[dict[float, dict[str, torch.Tensor]]] = [{s: {} for s in strengths} for _ in paths]
    for key, w in load_file(str(out)).items():
        i, s, name = key.split("|")
        merged[int(i)][float(s)][name] = w
    return merged


@pytest.mark.comfyui
def test_same_weights_as_comfyui(tiny_source: ModelSource, tmp_path: Path) -> None:
    import os

    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if not comfyui_dir:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    engine = FluxEngine(tiny_source, CPU)
    original = _weights(engine)
    configs = ["lokr", "lokr-decompose-both", "loha", "lora-dora-per-input"]
    refs = [_make(tmp_path, engine.transformer, c) for c in configs]
    merged = _comfy_merged(comfyui_dir, [r.path for r in refs], original, STRENGTHS, tmp_path)
    for config, ref, comfy_by_strength in zip(configs, refs, merged):
        for s in STRENGTHS:
            comfy = comfy_by_strength[s]
            assert set(comfy) == set(ref.trained), config
            engine.apply(LoraStack.of((ref.path, s)))
            _assert_weights(engine, comfy, original, f"{config} at {s} vs ComfyUI")
