"""The one internal form every LoRA file is normalised to."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale


@dataclass(frozen=True)
class NormalizedLora:
    """A parsed LoRA file.

    transformer: diffusers ``FluxTransformer2DModel`` module name (``transformer_blocks.0.attn.to_q``)
        -> LoraLayer.
    text_encoder: CLIP-L ``CLIPTextModel`` module name (``text_model.encoder.layers.0.self_attn.q_proj``)
        -> LoraLayer.
    text_encoder_2: T5 ``T5EncoderModel`` module name -> LoraLayer.
    source_format: ``diffusers`` | ``kohya`` | ``xlabs`` | ``bfl`` (for messages and the summary).
    """

    path: str
    source_format: str
    transformer: dict[str, LoraLayer]
    text_encoder: dict[str, LoraLayer] = field(default_factory=dict)
    text_encoder_2: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.transformer.values()), default=0)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self.transformer)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NormalizedLora:
        """A copy with every tensor on ``device`` in ``dtype`` (staging for fast swaps)."""

        def move(part: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
            return {n: LoraLayer(layer.down.to(device, dtype), layer.up.to(device, dtype), layer.scale)
                    for n, layer in part.items()}

        return NormalizedLora(self.path, self.source_format, move(self.transformer),
                              move(self.text_encoder), move(self.text_encoder_2))

    def nbytes(self) -> int:
        n = 0
        for part in (self.transformer, self.text_encoder, self.text_encoder_2):
            for layer in part.values():
                n += layer.down.numel() * layer.down.element_size() + layer.up.numel() * layer.up.element_size()
        return n
