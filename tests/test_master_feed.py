"""Masters in system RAM sent to the swap's device a group at a time (``lora/master_feed.py``): every
layer gets exactly its master, in any order the swap asks, with at most one group on the device.
On the CPU the stager's chunks are ordinary memory; on a GPU the engine's swaps with masters in RAM
are checked against masters on the GPU (``tests/test_gpu.py``)."""

from __future__ import annotations

import torch

from fastlora_core.lora.master_feed import MasterFeed
from fastlora_core.lora.staging import PinnedStager


def _masters() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"blocks.{i}.proj": torch.randn(8 + i, 16, generator=g).to(torch.bfloat16) for i in range(9)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_each_layer_gets_exactly_its_master_in_groups_no_larger_than_the_limit() -> None:
    masters = _masters()
    names = sorted(masters)
    limit = _nbytes(masters[names[0]]) * 3  # about three layers a group
    sizes: list[int] = []
    stager = PinnedStager("cpu", chunk_bytes=200)

    def counting(wanted):  # type: ignore[no-untyped-def]
        sizes.append(sum(_nbytes(t) for t, _ in wanted))
        return stager(wanted)

    feed = MasterFeed(masters, names, torch.device("cpu"), counting, group_bytes=limit)  # type: ignore[arg-type]
    for n in names:
        got = feed.get(n)
        assert got.dtype == masters[n].dtype and torch.equal(got, masters[n]), n
        assert got.data_ptr() != masters[n].data_ptr()  # a copy on the device, not the master itself
    assert feed.groups == len(sizes) > 1
    assert all(size <= limit for size in sizes), sizes
    assert sum(sizes) == sum(_nbytes(masters[n]) for n in names)  # each master sent once


def test_a_layer_that_is_larger_than_a_group_still_comes_alone() -> None:
    masters = _masters()
    names = sorted(masters)
    feed = MasterFeed(masters, names, torch.device("cpu"), PinnedStager("cpu"), group_bytes=1)
    for n in names:
        assert torch.equal(feed.get(n), masters[n])
    assert feed.groups == len(names)


def test_names_asked_out_of_plan_or_skipped_are_still_right() -> None:
    masters = _masters()
    names = sorted(masters)
    planned = names[:5]
    feed = MasterFeed(masters, planned + ["not-a-master"], torch.device("cpu"), PinnedStager("cpu"),
                      group_bytes=10**9)
    # A skipped layer (its stack emptied) and one the plan did not name, then back into the plan.
    for n in (names[2], names[4], names[7], names[0]):
        assert torch.equal(feed.get(n), masters[n]), n


def test_a_group_that_cannot_be_sent_falls_back_to_one_copy_per_layer() -> None:
    masters = _masters()
    names = sorted(masters)

    def out_of_memory(wanted):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    feed = MasterFeed(masters, names, torch.device("cpu"), out_of_memory)  # type: ignore[arg-type]
    for n in names:
        assert torch.equal(feed.get(n), masters[n]), n
    assert feed.groups == 0
