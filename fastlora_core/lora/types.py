"""The one internal form every LoRA file is normalised to.

A layer is either a :class:`LoraLayer` (low-rank factors: both strategies) or a
:class:`DenseLayer` (LyCORIS LoKr / LoHa, a full ``diff``, a bias ``diff_b``, or any of these or a
LoRA with DoRA weight decomposition: a dense delta computed at apply time, ``fused`` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch


def file_float(t: torch.Tensor) -> torch.Tensor:
    """An independent CPU copy in the file's floating dtype (fp32/bf16/fp16 are kept: converting a
    bf16 LoRA to fp32 would double its RAM and transfer cost and add no information); anything else
    (fp8 storage...) becomes fp32. The one dtype rule of the normal form's tensors."""
    dtype = t.dtype if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraLayer:
        return LoraLayer(self.down.to(device, dtype), self.up.to(device, dtype), self.scale)

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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> DenseLayer:
        """Factors in ``dtype`` on ``device``; the DoRA magnitude stays float32 (it divides a norm)."""
        return replace(
            self,
            factors={k: t.to(device, dtype) for k, t in self.factors.items()},
            magnitude=None if self.magnitude is None else self.magnitude.to(device, torch.float32),
            bias=None if self.bias is None else self.bias.to(device, dtype),
        )

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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NormalizedLora:
        """A copy with every tensor on ``device`` in ``dtype`` (staging for fast swaps)."""

        def move(part: dict[str, Layer]) -> dict[str, Layer]:
            return {n: layer.to(device, dtype) for n, layer in part.items()}

        return NormalizedLora(self.path, self.source_format, move(self.transformer),
                              move(self.text_encoder), move(self.text_encoder_2))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for part in (self.transformer, self.text_encoder, self.text_encoder_2)
                   for layer in part.values())
