"""Cancel inside a sampling step: a check between the transformer's blocks.

A Flux step runs 19 double and 38 single blocks; checking only between steps makes Cancel wait for
a whole step (seconds on a small GPU, minutes on a CPU). ``install`` turns the transformer's two
block lists into ``CheckedBlocks``: iterating them (what the transformer's own forward does) calls
the current check before each block. The check lives in a holder, so nothing is traced into a
compiled graph: with ``compile=regional`` (and ``off``) the loop over blocks is plain Python and each
compiled block stays exactly the graph it was; with ``compile=full`` the whole forward is one graph,
so the lists are left alone and Cancel acts between steps only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")

Check = Callable[[], None]


class CheckHolder:
    """The check of the generation in progress (None between generations)."""

    def __init__(self) -> None:
        self.check: Check | None = None


class CheckedBlocks(torch.nn.ModuleList):
    """A ModuleList whose iteration calls ``holder.check()`` before each block. Same modules, same
    state dict; only ``__iter__`` differs."""

    _fastlora_holder: CheckHolder

    def __iter__(self) -> Iterator[torch.nn.Module]:
        holder = self.__dict__.get("_fastlora_holder")
        for block in super().__iter__():
            check = holder.check if holder is not None else None
            if check is not None:
                check()
            yield block


def install(transformer: torch.nn.Module, holder: CheckHolder) -> int:
    """Make the transformer's block lists call ``holder.check`` between blocks; returns how many
    lists were changed (0 for a transformer without them)."""
    n = 0
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            blocks.__class__ = CheckedBlocks
            blocks.__dict__["_fastlora_holder"] = holder
            n += 1
    return n


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to plain ModuleLists (before a full-graph compile)."""
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, CheckedBlocks):
            blocks.__class__ = torch.nn.ModuleList  # type: ignore[assignment]
            blocks.__dict__.pop("_fastlora_holder", None)
