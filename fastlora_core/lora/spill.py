"""GPU tensors copied to system RAM through two pinned chunks (decision 65).

When ComfyUI needs GPU memory, an engine with its fused masters on the GPU moves them to system RAM
(22 GiB for Flux.1-dev) instead of being released. One ``tensor.to("cpu")`` per master copies from the
device into pageable memory through the driver's small bounce buffer, synchronously: 18.4 s for the
22.2 GiB on an H100 (2026-12-07), as long as rebuilding the engine. :func:`to_ram` instead copies
pieces of up to ``chunk_bytes`` into two page-locked chunks in turn, asynchronously on a stream of its
own, and while the device fills one chunk the CPU copies the other into the tensors' new pageable
memory (torch's CPU copy runs on its worker threads, which also take the first-touch page faults).

The copies are bit for bit their sources. Where pinned memory cannot be had, each tensor is copied
with ``tensor.to("cpu")``. Sources on the CPU go through the same pieces and chunks synchronously, in
ordinary memory, which is what the CPU tests check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch

logger = logging.getLogger(__name__)

#: Bytes per pinned chunk (two for one call, returned to torch's pinned-memory cache after it).
CHUNK_BYTES = 256 * 2**20


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return t.reshape(-1).view(torch.uint8)


def to_ram(tensors: Sequence[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> list[torch.Tensor]:
    """New CPU tensors equal to ``tensors`` (contiguous copies, same shapes and dtypes). Tensors already
    on the CPU are returned as they are."""
    sources = [t.contiguous() for t in tensors]
    out = [t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype) for t in sources]
    moving = [(src, dst) for src, dst in zip(sources, out, strict=True) if src.device.type != "cpu"]
    if moving and not copy_pieces(pieces(moving, chunk_bytes)):
        return [t.to("cpu") for t in sources]
    return out


def pieces(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], chunk_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source bytes, destination bytes) pieces of at most ``chunk_bytes``, in order."""
    return [(_bytes(src)[i:i + chunk_bytes], _bytes(dst)[i:i + chunk_bytes]) for src, dst in pairs
            for i in range(0, src.numel() * src.element_size(), chunk_bytes)]


def copy_pieces(todo: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Copy each source piece into its destination through two chunks (pinned, and filled on a
    stream of their own, where the sources are on a CUDA device); False where no chunk could be had."""
    if not todo:
        return True
    device = todo[0][0].device
    cuda = device.type == "cuda"
    largest = max(src.numel() for src, _ in todo)
    try:
        chunks = [torch.empty(largest, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    except RuntimeError as exc:  # no pinned memory to be had: the caller copies tensor by tensor
        logger.warning("no pinned memory for moving tensors to RAM (%s); copying them one by one", exc)
        return False
    stream = torch.cuda.Stream(device) if cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))  # the sources' pending writes
    events = [torch.cuda.Event() if cuda else None for _ in range(2)]
    pending: tuple[int, torch.Tensor, int] | None = None  # (chunk index, destination, bytes)
    for n, (src, dst) in enumerate(todo):
        k = n % 2  # this chunk's previous piece was copied out below, in this thread, before now
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            chunks[k][:src.numel()].copy_(src, non_blocking=cuda)
            event = events[k]
            if event is not None:
                event.record(stream)
        if pending is not None:
            _drain(chunks, events, *pending)
        pending = (k, dst, src.numel())
    assert pending is not None
    _drain(chunks, events, *pending)
    return True


def _drain(chunks: list[torch.Tensor], events: list[torch.cuda.Event | None], k: int, dst: torch.Tensor,
           size: int) -> None:
    """Wait for chunk ``k``'s copy from the device, then copy it into ``dst`` (torch's CPU threads)."""
    event = events[k]
    if event is not None:
        event.synchronize()
    dst.copy_(chunks[k][:size])
