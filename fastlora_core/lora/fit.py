"""The model side of a LoRA: which linear layers a model has, which of them a Flux LoRA can target,
and whether a LoRA fits them (every check runs before anything is written)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import LoraFitError
from .formats import _MAX_KEYS_IN_MESSAGE
from .targets import _lookup
from .types import DenseLayer, Layer, NormalizedLora


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear-like module (plain, torchao-quantised, bitsandbytes or PEFT-wrapped) by its name
    in the original model: without torch.compile's ``_orig_mod.`` and PEFT's internals (the
    ``.base_layer`` it wraps, its ``lora_A.<adapter>`` ... modules). A PEFT wrapper is returned
    itself (it has ``weight``, ``in_features`` and ``out_features`` of its base layer). The one
    walker over a model's linear layers: the strategies and the fit checks both use it."""
    out: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        name = name.removeprefix("_orig_mod.")
        if name.endswith(".base_layer") or ".lora_" in name or name.startswith("lora_"):
            continue
        if isinstance(module, torch.nn.Linear) or isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
            out[name] = module
    return out


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------


def _is_flux_target(name: str) -> bool:
    found = _lookup(name, ("diffusers",), False)
    return found is not None and found[1][0] == (name,)


def flux_lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Every ``nn.Linear`` of a ``FluxTransformer2DModel`` that a Flux LoRA can target, in model order.

    That is all Linear layers of ``transformer_blocks`` / ``single_transformer_blocks`` plus the
    embedders (``x_embedder``, ``context_embedder``, ``time_text_embed.*``), ``norm_out.linear`` and
    ``proj_out`` - exactly the names :func:`read_lora` can produce. Works on a plain model, a
    ``torch.compile`` wrapper and a model already holding PEFT LoRA layers (the wrapped layers are
    reported by their own name). Used to build the "all Flux layers" dummy adapter.
    """
    return [name for name in linear_modules(transformer) if _is_flux_target(name)]


def validate_against(
    lora: NormalizedLora,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> None:
    """Check that every layer of ``lora`` exists in the given model(s) with matching shapes.

    Every layer's ``in_features`` / ``out_features`` must equal the model layer's (and a bias
    delta needs a layer with a bias). Text-encoder parts are checked only when their model is
    given; CLIP names (``text_model.encoder...``) also match a flattened ``CLIPTextModel`` (recent
    transformers has no ``text_model`` level). Nothing is modified.

    Raises:
        LoraFitError: naming the file and the first layers that are missing or do not fit,
            saying that the LoRA was made for a Flux model of another size or not for Flux.1.
    """
    problems: list[str] = []
    total = 0
    checks: list[tuple[dict[str, Layer], torch.nn.Module | None, str]] = [
        (lora.transformer, transformer, ""),
        (lora.text_encoder, text_encoder, "text_encoder."),
        (lora.text_encoder_2, text_encoder_2, "text_encoder_2."),
    ]
    for layers, model, label in checks:
        if model is None or not layers:
            continue
        total += len(layers)
        problems += fit_problems(layers, linear_modules(model), label)
    raise_if_unfit(lora.path, problems, total)


def fit_problems(layers: Mapping[str, Layer], linears: Mapping[str, torch.nn.Module],
                 label: str = "") -> list[str]:
    """One line per layer of ``layers`` that is missing from ``linears`` (name -> a linear-like
    module with ``in_features``/``out_features``: plain, quantised or PEFT-wrapped), has other
    sizes, or has a bias delta (``diff_b``) where the model's layer has no bias. A bias-only layer
    has no input width (``in_features`` -1) and is checked on its output rows. CLIP names
    ``text_model.encoder...`` also match a flattened ``CLIPTextModel``."""
    problems: list[str] = []
    for name, layer in layers.items():
        linear = linears.get(name)
        if linear is None and name.startswith("text_model."):
            linear = linears.get(name.removeprefix("text_model."))
        if linear is None:
            problems.append(f"{label}{name}: no such layer in the model")
            continue
        in_f, out_f = int(linear.in_features), int(linear.out_features)  # type: ignore[arg-type]
        lora_in = layer.in_features
        if (lora_in >= 0 and lora_in != in_f) or layer.out_features != out_f:
            problems.append(
                f"{label}{name}: LoRA {lora_in if lora_in >= 0 else '?'}->{layer.out_features}, "
                f"model {in_f}->{out_f}"
            )
        elif isinstance(layer, DenseLayer) and layer.bias is not None \
                and getattr(getattr(linear, "base_layer", linear), "bias", None) is None:
            problems.append(f"{label}{name}: the LoRA changes its bias (diff_b), but the model's layer has none")
    return problems


def raise_if_unfit(path: str, problems: list[str], total: int) -> None:
    """Raise LoraFitError naming the file and the first problems (no-op when there are none)."""
    if problems:
        shown = "; ".join(problems[:_MAX_KEYS_IN_MESSAGE])
        more = len(problems) - _MAX_KEYS_IN_MESSAGE
        raise LoraFitError(
            f"LoRA file {path} does not fit this model: {len(problems)} of {total} layers are missing or "
            f"have other sizes ({shown}{f' and {more} more' if more > 0 else ''}). This LoRA was made for a "
            "Flux model of another size, or not for Flux.1 at all (Flux.2, SD3, Chroma ...): use a LoRA "
            "trained for this model. Nothing was changed."
        )
