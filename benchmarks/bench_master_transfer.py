"""How fast the fused strategy's bf16 masters can come from system RAM (the 24 GB tier, 16 GB MODEL).

    python -m benchmarks.bench_master_transfer --out DIR [--repeats 3]

With the masters in system RAM (``fused`` on a card without room for them), a swap reads each touched
layer's master to the GPU, merges the LoRA into it and requantises it: 2.0-3.1 s per rank-64 swap on
the H100/H200 hosts (RESULTS, 24 GB ``fused`` tier), where the GPU work alone takes ~35-65 ms. This
times the transfer of the 418 masters a full Flux LoRA touches (Flux.1-dev's shapes, bf16, ~17 GB),
each way end to end (synchronised), with a rank-64 ``addmm`` into a scratch buffer after each layer's
copy, as the merge does:

- ``pageable``: one ``master.to(cuda, non_blocking=True)`` per layer from ordinary memory (the
  engine's way before decision 62: the copy goes through the driver's small bounce buffer, synchronously);
- ``staged``: the engine's ``MasterFeed`` (decision 62): groups of layers (``--group-mib``, default the
  engine's 256) through ``PinnedStager`` (two pinned chunks, packing threads, asynchronous copies);
- ``pinned``: the masters held in page-locked memory (pinned once, timed apart), one asynchronous copy
  per layer: the ceiling, at the price of ~17 GB of RAM the OS can no longer page.

Results (GB/s, seconds per full set) go to ``DIR/master_transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastlora_core.lora.master_feed import GROUP_BYTES, MasterFeed
from fastlora_core.lora.staging import PinnedStager


def flux_master_shapes() -> list[tuple[int, int]]:
    """(out, in) of the 418 linear layers a full Flux.1-dev LoRA targets (19 double, 38 single blocks)."""
    d, mlp = 3072, 12288
    double = [(d, d)] * 8 + [(mlp, d), (d, mlp)] * 2  # q k v out, add_q add_k add_v add_out; ff, ff_context
    single = [(d, d)] * 3 + [(mlp, d), (d, d + mlp)]  # q k v, proj_mlp, proj_out
    return double * 19 + single * 38


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-mib", type=int, default=GROUP_BYTES // 2**20)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (a smoke test)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the code paths, no pinning")
    a = ap.parse_args()

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    shapes = flux_master_shapes()[:a.layers or None]
    t0 = time.perf_counter()
    masters = [torch.ones(s, dtype=torch.bfloat16) for s in shapes]
    total = sum(m.numel() * 2 for m in masters)
    made_s = time.perf_counter() - t0
    ups = {s[0]: torch.randn(s[0], a.rank, dtype=torch.bfloat16, device=dev) for s in shapes}
    downs = {s[1]: torch.randn(a.rank, s[1], dtype=torch.bfloat16, device=dev) for s in shapes}
    scratch = torch.empty(max(m.numel() for m in masters), dtype=torch.bfloat16, device=dev)

    def merge(src: torch.Tensor) -> None:
        out = scratch[:src.numel()].view(src.shape)
        torch.addmm(src, ups[src.shape[0]], downs[src.shape[1]], alpha=0.5, out=out)

    def pageable() -> None:
        for m in masters:
            merge(m.to(dev, non_blocking=True))

    stager = PinnedStager(dev, read_files=False)  # as the engine's master feed
    by_name = {str(i): m for i, m in enumerate(masters)}

    def staged() -> None:  # the engine's own feed, one swap's worth
        feed = MasterFeed(by_name, by_name, dev, stager, group_bytes=a.group_mib * 2**20)
        for name in by_name:
            merge(feed.get(name))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    results: dict[str, object] = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                  "layers": len(shapes), "gb": round(total / 1e9, 2), "made_s": round(made_s, 2),
                                  "group_mib": a.group_mib, "pack_threads": stager.threads}

    def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        runs = []
        for _ in range(a.repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - t)
        results[name] = {"s": [round(r, 3) for r in runs], "gb_per_s": round(total / 1e9 / min(runs), 1)}
        print(name, results[name], flush=True)

    with torch.inference_mode():
        timed("pageable", pageable)
        timed("staged", staged)
        t = time.perf_counter()
        pinned = [m.pin_memory() if cuda else m for m in masters]
        results["pin_s"] = round(time.perf_counter() - t, 2)
        del masters[:]
        by_name.clear()

        def pinned_copy() -> None:
            for m in pinned:
                merge(m.to(dev, non_blocking=True))

        timed("pinned", pinned_copy)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "master_transfer.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
