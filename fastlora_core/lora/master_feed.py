"""The fused strategy's masters, sent from system RAM to the GPU a group at a time during a swap.

Where the bf16 masters live in system RAM (``fused`` on a card without room for them: the 24 GB
tier, the 16 GB MODEL path), every layer a swap rewrites needs its master on the GPU. One
``master.to(cuda)`` per layer copies from pageable memory through the driver's small bounce buffer,
synchronously, layer after layer: ~17 GB for a LoRA on all 418 layers of Flux.1-dev, the 1.8-3.1 s
swaps of the 24 GB ``fused`` tier (benchmarks/RESULTS.md; 0.8-0.9 s with this feed on an H100).
:class:`MasterFeed` knows, before the swap starts, which masters it will ask for and in which order;
it sends them in groups of up to ``group_bytes`` through a :class:`~.staging.PinnedStager` (two
pinned chunks filled by several threads, asynchronous copies: how LoRA files reach the GPU), and
hands each layer its master from the group on the GPU (ARCHITECTURE decision 62). The copies are
bit for bit the masters, so a swap's weights do not change, only how long the masters take to arrive.

The group on the GPU is the feed's only extra memory: at most ``group_bytes`` (256 MiB), against
the ~100 MiB of the largest single layer the per-layer copy held. Where a group cannot be sent (out
of pinned or device memory), the feed falls back to the per-layer copy for the rest of the swap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from .staging import PinnedStager

logger = logging.getLogger(__name__)

#: Most master bytes on the GPU at once (one group).
GROUP_BYTES = 256 * 2**20


class MasterFeed:
    """Masters of ``names`` (in the order a swap asks for them) on ``device``, a group at a time."""

    def __init__(self, masters: dict[str, torch.Tensor], names: Iterable[str], device: torch.device,
                 stager: PinnedStager, group_bytes: int | None = None) -> None:
        """``group_bytes``: most bytes sent at once (default :data:`GROUP_BYTES`)."""
        self._masters = masters
        self._order = [n for n in dict.fromkeys(names) if n in masters]
        self._index = {n: i for i, n in enumerate(self._order)}
        self._device = device
        self._stager: PinnedStager | None = stager  # None once a group failed: per-layer copies
        self._group_bytes = GROUP_BYTES if group_bytes is None else group_bytes
        self._staged: dict[str, torch.Tensor] = {}
        #: groups sent so far (for tests and logs)
        self.groups = 0

    def get(self, name: str) -> torch.Tensor:
        """``name``'s master on the device (a view of its group's allocation). A name the feed was
        not told of is copied on its own."""
        staged = self._staged.get(name)
        if staged is not None:
            return staged
        start = self._index.get(name)
        if start is None or self._stager is None:
            return self._masters[name].to(self._device)
        self._staged = {}  # the previous group's allocation is free for this one
        group: list[str] = []
        size = 0
        for n in self._order[start:]:
            nbytes = self._masters[n].numel() * self._masters[n].element_size()
            if group and size + nbytes > self._group_bytes:
                break
            group.append(n)
            size += nbytes
        try:
            sent = self._stager([(self._masters[n], self._masters[n].dtype) for n in group])
        except RuntimeError as exc:  # out of (pinned or device) memory for a group: one layer at a time
            logger.warning("sending masters in groups failed (%s); copying them one layer at a time", exc)
            self._stager = None
            return self._masters[name].to(self._device)
        self._staged = dict(zip(group, sent))
        self.groups += 1
        return self._staged[name]
