"""A ComfyUI custom node pack used only by ``benchmarks/bench_server.py`` (copied into the server's
``custom_nodes``; never shipped with FastLoRA).

- ``BenchConditioning``: Flux CONDITIONING (T5 context ``[1, tokens, 4096]``, pooled CLIP ``[1, 768]``,
  guidance) from a seed, as ComfyUI's CLIP nodes would make it. The benchmark compares diffusion
  models; running a random full-size T5 through ComfyUI's CLIP nodes would only add the same constant
  to every path (ComfyUI caches the node's output between queued graphs either way).
- ``GET /bench/stats``: peak GPU memory of the server process (allocated and reserved, GiB) and
  ``torch._dynamo``'s count of compiled graphs (ComfyUI's ``TorchCompileModel`` and FastLoRA alike).
- ``GET /bench/nodes``: seconds spent in each node class since the previous call (ComfyUI's per-node
  ``execution.execute`` wrapped), so a slow image can be split into LoRA loader, sampler and decode;
  also, in parentheses, the whole prompt's execution and ComfyUI's housekeeping between and inside
  prompts (``gc.collect``, ``soft_empty_cache``, ``cleanup_models_gc``), which no node accounts for.
- ``FASTLORA_BENCH_CARD_GIB``: when set, PyTorch's allocator in the server is capped at that many GiB
  (``set_per_process_memory_fraction``) at import, so the server runs as on a smaller card
  (``bench_server --card-gib``, which also passes ComfyUI ``--reserve-vram``).
- ``GET /bench/idle``: whether ComfyUI's housekeeping after the last prompt is still due. Its prompt
  worker runs a full ``gc.collect()`` after a prompt once 10 s have passed since the previous one
  (main.py, ``gc_collect_interval``); queued back to back, that pause lands in whichever image comes
  next. The benchmark waits for it so each image measures itself (see ``bench_server``).
"""

from __future__ import annotations

import gc
import logging
import os
import time

import comfy.model_management
import execution
import torch
from aiohttp import web
from server import PromptServer


def _cap_memory() -> None:
    card_gib = float(os.environ.get("FASTLORA_BENCH_CARD_GIB") or 0)
    if card_gib and torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * 2**30 / total))
        logging.info("bench probe: PyTorch's allocator capped at %.1f GiB", card_gib)


_cap_memory()


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

NODE_SECONDS: dict[str, float] = {}
_execute = execution.execute


def _add(name: str, start: float) -> None:
    NODE_SECONDS[name] = NODE_SECONDS.get(name, 0.0) + time.perf_counter() - start


async def _timed_execute(server, dynprompt, caches, current_item, *args, **kwargs):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    try:
        return await _execute(server, dynprompt, caches, current_item, *args, **kwargs)
    finally:
        try:
            name = dynprompt.get_node(current_item)["class_type"]
        except Exception:  # noqa: BLE001 - timing must never break execution
            name = str(current_item)
        _add(name, start)


execution.execute = _timed_execute


def _timed(name: str, fn):  # noqa: ANN001, ANN202
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, start)
    return wrapper


def _timed_async(name: str, fn):  # noqa: ANN001, ANN202
    async def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            _add(name, start)
    return wrapper


LAST = {"prompt_end": 0.0, "gc_start": 0.0}
_collect = gc.collect


def _collect_marked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    LAST["gc_start"] = time.perf_counter()
    return _collect(*args, **kwargs)


async def _prompt_marked(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    try:
        return await _execute_async(self, *args, **kwargs)
    finally:
        LAST["prompt_end"] = time.perf_counter()


_execute_async = execution.PromptExecutor.execute_async
gc.collect = _timed("(gc.collect)", _collect_marked)
comfy.model_management.soft_empty_cache = _timed("(soft_empty_cache)", comfy.model_management.soft_empty_cache)
comfy.model_management.cleanup_models_gc = _timed("(cleanup_models_gc)", comfy.model_management.cleanup_models_gc)
execution.PromptExecutor.execute_async = _timed_async("(prompt)", _prompt_marked)


@PromptServer.instance.routes.get("/bench/nodes")
async def nodes(request: web.Request) -> web.Response:
    out = {k: round(v, 4) for k, v in NODE_SECONDS.items()}
    NODE_SECONDS.clear()
    return web.json_response(out)


@PromptServer.instance.routes.get("/bench/stats")
async def stats(request: web.Request) -> web.Response:
    from torch._dynamo.utils import counters

    cuda = torch.cuda.is_available()
    return web.json_response({
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
    })


@PromptServer.instance.routes.get("/bench/idle")
async def idle(request: web.Request) -> web.Response:
    return web.json_response({"housekeeping_pending": LAST["prompt_end"] > LAST["gc_start"]})
