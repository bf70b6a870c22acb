"""Registering FastLoRA's custom ops (``torch.ops.fastlora.*``): opaque to ``torch.compile``, with a fake
(meta) implementation for tracing.

One rule for every op: a process registers each name once. The pack can be imported twice under two
names (as ``fastlora_core`` and under ComfyUI's custom-node path), and a second registration of the
same name raises, so the second copy takes the first one's op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def register_once(name: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """``torch.ops.fastlora.<name>``: ``impl`` with ``fake`` for tracing, or the op an earlier copy of
    the pack registered under that name."""
    try:
        return getattr(torch.ops.fastlora, name)
    except AttributeError:
        op = torch.library.custom_op(f"fastlora::{name}", impl, mutates_args=())
        op.register_fake(fake)
        return op
