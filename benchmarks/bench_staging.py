"""What a new LoRA costs before its swap on the MODEL path: staging it on the GPU and checking it.

    python -m benchmarks.bench_staging OUT.json [--reps 5]

A rank-64 LoRA on Flux.1-dev's 418 attention/MLP layers (diffusers layer shapes, bf16 on the CPU as
ComfyUI's LoRA loaders hold it, ~520 MB) is copied to the GPU (a) one ``tensor.to`` per tensor
(the engine until 2026-12-03) and (b) through :class:`fastlora_core.lora.staging.PinnedStager`
(first call: pinned chunks allocated; later calls reuse them), and its values are checked for
NaN / infinities (``first_non_finite``) on the CPU copy vs the staged GPU copy. Also, as ComfyUI's
loaders hand it over, memory-mapped from a safetensors file (``safe_open`` per repetition: the file
is in the page cache, but every new mapping faults its pages in while staging) with the packing on
one thread and on ``PACK_THREADS`` copying through the mapping, and on ``PACK_THREADS`` reading the
mapped tensors' bytes from the file with ``preadv`` (the stager's default on Linux). Medians in ms.
On a CPU (smoke run) the staging rows copy within RAM and mean nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def main(out: str, reps: int) -> None:
    import torch

    from fastlora_core.lora.formats import first_non_finite
    from fastlora_core.lora.staging import PinnedStager
    from fastlora_core.lora.types import LoraLayer, NormalizedLora

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    h, m, double, single = (3072, 12288, 19, 38) if cuda else (64, 256, 2, 2)
    shapes = []  # (out, in) of the 418 targets
    for _ in range(double):
        shapes += [(h, h)] * 8 + [(m, h), (h, m), (m, h), (h, m)]
    for _ in range(single):
        shapes += [(h, h)] * 3 + [(m, h), (h, h + m)]
    g = torch.Generator().manual_seed(0)
    layers = {f"l{i}": LoraLayer(torch.randn(64, i_, generator=g).bfloat16(), torch.randn(o, 64, generator=g).bfloat16())
              for i, (o, i_) in enumerate(shapes)}
    lora = NormalizedLora("bench", "comfyui", layers, values_checked=False)
    res: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": len(layers),
                              "mbytes": round(lora.nbytes() / 1e6, 1)}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> list[float]:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(round((time.perf_counter() - t) * 1000, 1))
        return times

    def per_tensor() -> None:
        lora.to(dev, torch.bfloat16)

    stager = PinnedStager(dev)
    sync()
    t = time.perf_counter()
    staged = lora.to(dev, torch.bfloat16, copy_many=stager)
    sync()
    res["pinned_first_call_ms"] = round((time.perf_counter() - t) * 1000, 1)
    res["per_tensor_ms"] = timed(per_tensor)
    res["pinned_ms"] = timed(lambda: lora.to(dev, torch.bfloat16, copy_many=stager))
    res["check_cpu_ms"] = timed(lambda: first_non_finite(lora.tensors()))
    res["check_staged_ms"] = timed(lambda: first_non_finite(staged.tensors()))
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastlora_core.lora import staging

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/lora.safetensors"
        names = {f"{n}.{part}": t for n, layer in layers.items() for part, t in (("down", layer.down), ("up", layer.up))}
        save_file(names, path)

        def mapped() -> NormalizedLora:
            with safe_open(path, framework="pt", device="cpu") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}
            return NormalizedLora("bench", "comfyui", {n: LoraLayer(t[f"{n}.down"], t[f"{n}.up"]) for n in layers},
                                  values_checked=False)

        res["pack_threads"] = staging.PACK_THREADS
        for label, threads, read_files in (("mmap_one_thread_ms", 1, False),
                                           ("mmap_pinned_ms", staging.PACK_THREADS, False),
                                           ("mmap_read_files_ms", staging.PACK_THREADS, True)):
            s = PinnedStager(dev, threads=threads, read_files=read_files)
            s(list(zip([torch.zeros(1)], [torch.bfloat16])))  # pin its chunks outside the timing
            res[label] = timed(lambda s=s: mapped().to(dev, torch.bfloat16, copy_many=s))
            res[label.replace("_ms", "_bytes_read_from_file")] = s.last_read_bytes
            res[label.replace("_ms", "_last_call_split_ms")] = {k: round(v, 1) for k, v in s.last_ms.items()}
            if read_files:
                res["mmap_read_files_equals_source"] = all(
                    torch.equal(a.cpu(), b) for a, b in zip(mapped().to(dev, torch.bfloat16, copy_many=s).tensors().values(),
                                                            lora.tensors().values()))
        # Where the stager's time goes (file -> pinned memory, pinned memory -> GPU), each phase alone
        import os
        from concurrent.futures import ThreadPoolExecutor

        from fastlora_core.fileio import read_exactly
        from fastlora_core.lora.mapped import file_ranges

        def ranges_only() -> None:
            t = mapped()
            tensors = [x for layer in t.transformer.values() for x in (layer.down, layer.up)]  # type: ignore[union-attr]
            t0 = time.perf_counter()
            file_ranges(tensors)
            res.setdefault("file_ranges_only_ms", []).append(round((time.perf_counter() - t0) * 1000, 1))  # type: ignore[union-attr]

        for _ in range(reps):
            ranges_only()
        nbytes = lora.nbytes()
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        view = pinned.numpy().data
        tensors0 = [x for layer in mapped().transformer.values() for x in (layer.down, layer.up)]  # type: ignore[union-attr]
        spans = [r for r in file_ranges(tensors0) if r is not None]
        starts = [sum(r.nbytes for r in spans[:i]) for i in range(len(spans))]
        fd = os.open(path, os.O_RDONLY)
        with ThreadPoolExecutor(staging.PACK_THREADS) as pool:
            res["file_to_pinned_only_ms"] = timed(lambda: list(pool.map(
                lambda i: read_exactly(path, fd, view[starts[i]:starts[i] + spans[i].nbytes], spans[i].offset),
                range(len(spans)))))
        os.close(fd)
        gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        step = 64 * 2**20

        def h2d() -> None:
            for a in range(0, nbytes, step):
                gpu[a:a + step].copy_(pinned[a:a + step], non_blocking=cuda)

        res["pinned_to_gpu_only_ms"] = timed(h2d)
        for mib in (128, 256):  # larger chunks than the stager's default, reading from the file
            s = PinnedStager(dev, chunk_bytes=mib * 2**20)
            s(list(zip([torch.zeros(1)], [torch.bfloat16])))
            res[f"mmap_read_files_chunk{mib}_ms"] = timed(lambda s=s: mapped().to(dev, torch.bfloat16, copy_many=s))
    for k in ("per_tensor_ms", "pinned_ms", "check_cpu_ms", "check_staged_ms", "mmap_one_thread_ms",
              "mmap_pinned_ms", "mmap_read_files_ms", "mmap_read_files_chunk128_ms", "mmap_read_files_chunk256_ms",
              "file_ranges_only_ms", "file_to_pinned_only_ms", "pinned_to_gpu_only_ms"):
        res[k.replace("_ms", "_median_ms")] = statistics.median(res[k])  # type: ignore[arg-type]
    exact = all(torch.equal(a.cpu(), b) for a, b in zip(staged.tensors().values(), lora.tensors().values()))
    res["pinned_equals_source"] = exact
    Path(out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    sys.exit(main(a.out, a.reps))
