"""Reading the transformer's safetensors straight onto the GPU vs how the engine reads it today (issue 13).

    python -m benchmarks.bench_read OUT.json [--work DIR] [--threads 8] [--chunk-mb 256] [--tiny]

The engine build reads a diffusers folder with ``from_pretrained`` into CPU memory (5.2-5.4 s for
33.7 GB on the H200 host, 2026-12-04) and then copies the transformer's weights to the GPU one
pageable ``.to`` per tensor (the fused strategy's masters, 2.6-3.4 s). This measures, for the
transformer alone (random full-size Flux.1-dev, bf16, saved with ``save_pretrained``, in the page
cache):

- ``today``: ``FluxTransformer2DModel.from_pretrained`` on the CPU, then every tensor ``.to(cuda)``;
- ``direct``: each shard's header parsed, one GPU buffer per shard, its bytes read with ``os.preadv``
  by ``--threads`` threads into two pinned chunks of ``--chunk-mb`` that alternate, each chunk sent
  with one asynchronous copy (the next chunk is read while the previous one travels); tensors are
  views of the GPU buffers.

Both results are compared tensor by tensor (bitwise). ``--tiny``: the tiny model on the CPU (ordinary
memory, synchronous copies) as a smoke test of the same code. Results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fastlora_core.loading import TensorInfo


def header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))
    meta.pop("__metadata__", None)
    return 8 + n, meta


def _pread(fd: int, view: memoryview, offset: int) -> None:
    if os.preadv(fd, [view], offset) != len(view):
        raise OSError(f"short read at byte {offset}")


def read_direct(folder: Path, device: torch.device, threads: int, chunk: int) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's shards on ``device``, read through two pinned chunks."""
    cuda = device.type == "cuda"
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    done: list[Any] = [None, None]
    out: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(threads) as pool:
        for shard in sorted(folder.glob("*.safetensors")):
            start, meta = header(shard)
            size = shard.stat().st_size - start
            dst = torch.empty(size, dtype=torch.uint8, device=device)
            fd = os.open(shard, os.O_RDONLY)
            try:
                for k, pos in enumerate(range(0, size, chunk)):
                    which, n = k % 2, min(chunk, size - pos)
                    if done[which] is not None:
                        done[which].synchronize()  # the copy that used this chunk has left it
                    view = memoryview(bufs[which].numpy())[:n]
                    step = -(-n // threads)
                    parts = range(0, n, step)
                    list(pool.map(partial(_pread, fd), [view[i:i + step] for i in parts],
                                  [start + pos + i for i in parts]))
                    dst[pos:pos + n].copy_(bufs[which][:n], non_blocking=cuda)
                    if cuda:
                        done[which] = torch.cuda.Event()
                        done[which].record()
            finally:
                os.close(fd)
            for name, info in meta.items():
                a, b = info["data_offsets"]
                dtype = TensorInfo(info["dtype"], tuple(info["shape"])).torch_dtype  # the loaders' dtype table
                out[name] = dst[a:b].view(dtype).view(info["shape"])
    if cuda:
        torch.cuda.synchronize(device)
    return out


def read_today(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    out = {k: v.detach().to(device) for k, v in model.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--work", default="/tmp/fastlora-read")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--chunk-mb", type=float, default=256)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    folder = Path(a.work) / "transformer"
    device = torch.device("cpu" if a.tiny else "cuda")
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                           "device": "cpu" if a.tiny else torch.cuda.get_device_name(), "threads": a.threads,
                           "chunk_mb": a.chunk_mb}
    if not folder.is_dir():
        t0 = time.perf_counter()
        if a.tiny:
            from fastlora_core.tiny import build_tiny_pipeline

            model = build_tiny_pipeline().transformer.to(torch.bfloat16)
        else:
            from .fullsize import build_transformer

            model = build_transformer()
        model.save_pretrained(str(folder))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        res["write_s"] = round(time.perf_counter() - t0, 1)
    res["bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    from diffusers import FluxTransformer2DModel  # noqa: F401 - its lazy import (~6 s on a 2-core CPU) stays off the clock
    for name, fn in (("today", lambda: read_today(folder, device)),
                     ("direct", lambda: read_direct(folder, device, a.threads, int(a.chunk_mb * 2**20))),
                     ("direct_again", lambda: read_direct(folder, device, a.threads, int(a.chunk_mb * 2**20)))):
        t0 = time.perf_counter()
        got = fn()
        res[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        if name == "today":
            reference = {k: v.cpu() for k, v in got.items()}
        else:
            res[f"{name}_equal"] = set(got) == set(reference) and all(
                torch.equal(got[k].cpu(), reference[k]) for k in reference)
        del got
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(res), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
