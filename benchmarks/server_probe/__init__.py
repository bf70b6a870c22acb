"""A ComfyUI custom node pack used only by ``benchmarks/bench_server.py`` (copied into the server's
``custom_nodes``; never shipped with FastLoRA).

- ``BenchConditioning``: Flux CONDITIONING (T5 context ``[1, tokens, 4096]``, pooled CLIP ``[1, 768]``,
  guidance) from a seed, as ComfyUI's CLIP nodes would make it. The benchmark compares diffusion
  models; running a random full-size T5 through ComfyUI's CLIP nodes would only add the same constant
  to every path (ComfyUI caches the node's output between queued graphs either way).
- ``GET /bench/stats``: peak GPU memory of the server process (allocated and reserved, GiB) and
  ``torch._dynamo``'s count of compiled graphs (ComfyUI's ``TorchCompileModel`` and FastLoRA alike).
"""

from __future__ import annotations

import torch
from aiohttp import web
from server import PromptServer


class BenchConditioning:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 512, "min": 1}),
                             "guidance": ("FLOAT", {"default": 3.5})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed: int, tokens: int, guidance: float):  # noqa: ANN201
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, 4096, generator=g)
        return ([[context, {"pooled_output": torch.randn(1, 768, generator=g), "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"BenchConditioning": BenchConditioning}


@PromptServer.instance.routes.get("/bench/stats")
async def stats(request: web.Request) -> web.Response:
    from torch._dynamo.utils import counters

    cuda = torch.cuda.is_available()
    return web.json_response({
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
    })
