"""What the loader does while it waits for a background read (ARCHITECTURE decisions 42-44, 49).

A start's reads run on threads of their own (:mod:`.loading.direct`); while the loader waits for one it
runs these tasks, in this order, instead of leaving them to the first LoRA or image. The order is the
rule: each task may rely on the ones before it (the fp8 checks need torchao imported), and a task
that does not get a wait runs where it is first needed, so the earlier a task, the likelier it is hidden.
On an H100 the first three already fill every wait of a warm start (RESULTS, 2026-12-06). When the weights
come from the disk the loader hardly waits at all, and a thread of its own runs the list beside the reads
(decision 49, :class:`.loading.direct.BackgroundReads`): each task is safe to run beside its later step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import deps, fp8_projection
from .lora import fused
from .optimize import import_compiler
from .specs import EngineOptions


def while_reading(options: EngineOptions, device: torch.device) -> list[Callable[[], object]]:
    """The tasks, in order: the optional packages the checks vouched for from a record (torchao, which
    brings in Dynamo; Triton), the compiler's imports, and the first fp8 fused swap's and the fp8
    projection's kernel checks."""
    tasks: list[Callable[[], object]] = []
    if deps.deferred():
        tasks.append(deps.import_deferred)
    if options.compile != "off":
        tasks.append(import_compiler)
    if device.type == "cuda" and options.swap_strategy == "fused" and options.quantization == "fp8":

        def prepare_fp8_swaps() -> None:
            fused.prepare_fp8_swaps(device)

        def check_projection_kernel() -> None:  # decision 44's kernel, compiled and checked once
            fp8_projection.kernel_ok(device)

        # (the adapter strategy's LoRA layer takes proj_out's place: no use for the projection kernel)
        tasks += [prepare_fp8_swaps, check_projection_kernel]
    return tasks
