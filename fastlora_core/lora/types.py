"""The one internal form every LoRA file is normalised to.

A layer is either a :class:`LoraLayer` (low-rank factors: both strategies) or a
:class:`DenseLayer` (LyCORIS LoKr / LoHa, a full ``diff``, a bias ``diff_b``, or any of these or a
LoRA with DoRA weight decomposition: a dense delta computed at apply time, ``fused`` only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

#: ``fn(tensor, target dtype) -> tensor``: what :meth:`NormalizedLora.map` applies to each tensor.
TensorMap = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def file_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU in the file's floating dtype (fp32/bf16/fp16 are kept: converting a bf16 LoRA
    to fp32 would double its RAM and transfer cost and add no information); anything else (fp8
    storage...) becomes fp32. The one dtype rule of the normal form's tensors. No copy when nothing
    changes: the tensors a file is read into are already the process's own memory, not a mapping of
    the file (``formats._private_tensors``), and the normal form never writes into them."""
    dtype = t.dtype if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


@dataclass(frozen=True)
class LoraLayer:
    """LoRA weights of one target ``nn.Linear``: ``delta_W = scale * up @ down``.

    down: ``[rank, in_features]``; up: ``[out_features, rank]``; ``scale`` already includes
    ``alpha / rank`` (1.0 when the file has no alpha). The user's strength is applied on top.
    Tensors are on the CPU in the file's floating dtype (fp32, bf16 or fp16); consumers cast.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale

    def map(self, fn: TensorMap, dtype: torch.dtype) -> LoraLayer:
        """This layer with ``fn(tensor, target dtype)`` applied to each tensor (both in ``dtype``)."""
        return LoraLayer(fn(self.down, dtype), fn(self.up, dtype), self.scale)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraLayer:
        return self.map(lambda t, dt: t.to(device, dt), dtype)

    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


@dataclass(frozen=True)
class DenseLayer:
    """A layer whose delta is dense, computed at apply time in float32 by
    :func:`fastlora_core.lora.lycoris.weight_delta` (the maths, the key names and the norm
    conventions are documented there).

    kind: ``lora`` (``down`` / ``up``, only with DoRA), ``lokr`` (``w1`` or ``w1_a`` / ``w1_b``,
        ``w2`` or ``w2_a`` / ``w2_b`` [/ ``t2``]), ``loha`` (``w1_a``, ``w1_b``, ``w2_a``, ``w2_b``
        [/ ``t1``, ``t2``]), ``diff`` (``diff``: the full delta) or ``bias`` (no weight delta).
    factors: the tensors of ``kind`` by those names, as in the file (CPU, file dtype).
    scale: multiplies the rebuilt delta (``alpha / rank`` where the source defines one).
    shape: ``(out, in)`` of the rebuilt delta before ``rows``.
    rows: ``None`` (all rows) or the row ranges of the rebuilt delta this layer takes, in order:
        one fused ``qkv`` / ``linear1`` delta is split into the diffusers layers by row slicing,
        and BFL's ``(shift, scale)`` halves are swapped to diffusers' ``(scale, shift)``.
    magnitude: DoRA's magnitude (already cut to ``rows``), float32: ``[out]`` for a per-output-row
        norm (``dora_axis`` ``out``) or ``[in]`` per input column (``in``); ``None`` without DoRA.
    dora_eps: added to the norm (LyCORIS / kohya / ComfyUI: float32 eps; PEFT: 0).
    bias: a bias delta (``diff_b``, already cut to ``rows``) or ``None``.
    """

    kind: str
    factors: Mapping[str, torch.Tensor]
    scale: float
    shape: tuple[int, int]
    rows: tuple[tuple[int, int], ...] | None = None
    magnitude: torch.Tensor | None = None
    dora_axis: str = "out"
    dora_eps: float = 0.0
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    @property
    def out_features(self) -> int:
        if self.rows is None:
            return int(self.shape[0])
        return sum(b - a for a, b in self.rows)

    @property
    def has_weight_delta(self) -> bool:
        return self.kind != "bias"

    def describe(self) -> str:
        """``LoKr``, ``LoHa + DoRA``, ``full diff``... (for messages)."""
        name = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "diff": "full diff", "bias": "bias diff"}[self.kind]
        return name + (" + DoRA" if self.magnitude is not None else "")

    def map(self, fn: TensorMap, dtype: torch.dtype) -> DenseLayer:
        """This layer with ``fn(tensor, target dtype)`` applied to each tensor: factors and bias in
        ``dtype``, the DoRA magnitude in float32 (it divides a norm)."""
        return replace(
            self,
            factors={k: fn(t, dtype) for k, t in self.factors.items()},
            magnitude=None if self.magnitude is None else fn(self.magnitude, torch.float32),
            bias=None if self.bias is None else fn(self.bias, dtype),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> DenseLayer:
        """Factors in ``dtype`` on ``device``; the DoRA magnitude stays float32."""
        return self.map(lambda t, dt: t.to(device, dt), dtype)

    def nbytes(self) -> int:
        tensors = [*self.factors.values(), self.magnitude, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


Layer = LoraLayer | DenseLayer


@dataclass(frozen=True)
class NormalizedLora:
    """A parsed LoRA file.

    transformer: diffusers ``FluxTransformer2DModel`` module name (``transformer_blocks.0.attn.to_q``)
        -> layer.
    text_encoder: CLIP-L ``CLIPTextModel`` module name (``text_model.encoder.layers.0.self_attn.q_proj``)
        -> layer.
    text_encoder_2: T5 ``T5EncoderModel`` module name -> layer.
    source_format: ``diffusers`` | ``kohya`` | ``xlabs`` | ``bfl`` (for messages and the summary).
    """

    path: str
    source_format: str
    transformer: dict[str, Layer]
    text_encoder: dict[str, Layer] = field(default_factory=dict)
    text_encoder_2: dict[str, Layer] = field(default_factory=dict)
    #: False while its values were not checked for NaN / infinities: a LoRA built in memory, or a file
    #: read by the engine's LoRA cache; the engine checks its staged copy, on the GPU where that is
    #: nearly free (ARCHITECTURE decisions 23 and 32).
    values_checked: bool = True

    @property
    def max_rank(self) -> int:
        """The largest rank of the low-rank (:class:`LoraLayer`) transformer layers."""
        return max((layer.rank for layer in self.transformer.values() if isinstance(layer, LoraLayer)), default=0)

    def dense_kinds(self) -> list[str]:
        """What the :class:`DenseLayer` layers are (``LoKr``, ``LoRA + DoRA``...), sorted; empty for a
        plain LoRA."""
        parts = (self.transformer, self.text_encoder, self.text_encoder_2)
        return sorted({layer.describe() for part in parts for layer in part.values() if isinstance(layer, DenseLayer)})

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self.transformer)

    def map(self, fn: TensorMap, dtype: torch.dtype) -> NormalizedLora:
        """A copy with ``fn(tensor, target dtype)`` applied to every tensor, always in the same order
        (the layers' own dtype rules give the target: ``dtype``, DoRA magnitudes float32)."""

        def part(layers: dict[str, Layer]) -> dict[str, Layer]:
            return {n: layer.map(fn, dtype) for n, layer in layers.items()}

        return replace(self, transformer=part(self.transformer), text_encoder=part(self.text_encoder),
                       text_encoder_2=part(self.text_encoder_2))

    def to(self, device: torch.device | str, dtype: torch.dtype,
           copy_many: Callable[[list[tuple[torch.Tensor, torch.dtype]]], list[torch.Tensor]] | None = None,
           ) -> NormalizedLora:
        """A copy with every tensor on ``device`` in ``dtype`` (staging for fast swaps).

        ``copy_many``: moves all tensors in one go (a list of ``(tensor, target dtype)`` in
        :meth:`map`'s order -> the moved tensors, e.g. :class:`~.staging.PinnedStager`); one
        ``tensor.to`` per tensor without it."""
        if copy_many is None:
            return self.map(lambda t, dt: t.to(device, dt), dtype)
        wanted: list[tuple[torch.Tensor, torch.dtype]] = []

        def record(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
            wanted.append((t, dt))
            return t

        self.map(record, dtype)
        moved = iter(copy_many(wanted))
        return self.map(lambda t, dt: next(moved), dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a readable name (``transformer_blocks.0.attn.to_q.up``...), for checks."""
        out: dict[str, torch.Tensor] = {}
        for part in (self.transformer, self.text_encoder, self.text_encoder_2):
            for name, layer in part.items():
                if isinstance(layer, LoraLayer):
                    out[f"{name}.down"], out[f"{name}.up"] = layer.down, layer.up
                else:
                    out.update({f"{name}.{k}": t for k, t in layer.factors.items()})
                    out.update({f"{name}.{k}": t for k, t in (("magnitude", layer.magnitude), ("bias", layer.bias))
                                if t is not None})
        return out

    def nbytes(self) -> int:
        return sum(layer.nbytes() for part in (self.transformer, self.text_encoder, self.text_encoder_2)
                   for layer in part.values())
