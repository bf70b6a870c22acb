"""torchao-quantised weights seen from the fused strategy: tell one from a plain tensor, save and
restore it exactly (inner tensor by inner tensor), and re-quantise a merged high-precision weight
with the config that made it, copying the result in place so a compiled graph sees it."""

from __future__ import annotations

import torch

from ..optimize import torchao_config


def is_quantized(w: torch.Tensor) -> bool:
    return type(w) is not torch.Tensor and type(w) is not torch.nn.Parameter and hasattr(w, "__tensor_flatten__")


def requantize_like(weight: torch.Tensor, new_hp_weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Quantise ``new_hp_weight`` with the same torchao config that produced ``weight``; returns a
    tensor whose inner tensors can be copied into ``weight``'s (same shapes)."""
    from torchao.quantization import quantize_

    fast = _requantize_float8_rowwise(weight, new_hp_weight)
    if fast is not None:
        return fast

    lin = torch.nn.Linear(new_hp_weight.shape[1], new_hp_weight.shape[0], bias=False,
                          device=new_hp_weight.device, dtype=new_hp_weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(new_hp_weight)
    quantize_(lin, torchao_config(mode))
    return lin.weight


def _requantize_float8_rowwise(weight: torch.Tensor, new_hp_weight: torch.Tensor) -> torch.Tensor | None:
    """Fast path for torchao's per-row ``Float8Tensor`` (our ``fp8``): the same ``from_hp`` call
    ``quantize_`` makes, without building a module per layer. None for other layouts."""
    try:
        from torchao.quantization import Float8Tensor, PerRow
    except ImportError:  # pragma: no cover - older torchao
        return None
    if not isinstance(weight, Float8Tensor) or list(weight.block_size) != [1, weight.shape[-1]]:
        return None
    return Float8Tensor.from_hp(new_hp_weight, float8_dtype=weight.qdata.dtype, granularity=PerRow(),
                                kernel_preference=weight.kernel_preference)


def copy_into_quantized(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a torchao tensor subclass into another of the same layout, inner tensor by inner tensor
    (in place, so a compiled graph that reads ``dst`` sees the new values)."""
    dst_inner, src_inner = _inner_tensors(dst), _inner_tensors(src)
    if [n for n, _ in dst_inner] != [n for n, _ in src_inner]:
        raise RuntimeError(f"cannot copy {type(src).__name__} into {type(dst).__name__}: layouts differ")
    for (_, d), (_, s) in zip(dst_inner, src_inner):
        d.copy_(s)


def _inner_tensors(t: torch.Tensor, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The plain tensors inside a (possibly nested) torchao tensor subclass, by flattened name."""
    out: list[tuple[str, torch.Tensor]] = []
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    for n in names:
        inner = getattr(t, n)
        if hasattr(inner, "__tensor_flatten__"):
            out += _inner_tensors(inner, prefix + n + ".")
        else:
            out.append((prefix + n, inner))
    return out


def clone_quantized(t: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The inner tensors of a torchao weight, cloned (flattened names -> tensors)."""
    return {n: inner.detach().to(device, copy=True) for n, inner in _inner_tensors(t)}


def restore_quantized(dst: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
    """Copy tensors saved by ``clone_quantized`` back into ``dst``, in place."""
    for n, inner in _inner_tensors(dst):
        inner.copy_(saved[n])
