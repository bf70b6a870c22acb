"""Do two host-to-device copies from pageable memory overlap when issued from two threads (issue 13)?

    python -m benchmarks.bench_overlap OUT.json [--gb-a 23] [--gb-b 9.5]

The engine build copies the transformer's weights (~23 GB, the fused strategy's masters) and then the
text encoders and VAE (~10 GB) to the GPU, each as per-tensor ``.to(device)`` from pageable memory.
This times A alone, B alone, and both at once (B on a second thread with its own CUDA stream), from
resident bf16 tensors of 64 MiB. CUDA only. Result and the engine attempt it led to: RESULTS.md,
"Start-up, 2026-12-04".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time

import torch


def tensors(gb: float) -> list[torch.Tensor]:
    n = max(1, int(gb * 2**30 / 2**26))
    out = [torch.empty(2**25, dtype=torch.bfloat16) for _ in range(n)]
    for t in out:
        t.fill_(1.0)  # resident, not lazily mapped
    return out


def move(ts: list[torch.Tensor], stream: torch.cuda.Stream | None = None) -> list[torch.Tensor]:
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out = [t.to("cuda") for t in ts]
    (stream or torch.cuda.current_stream()).synchronize()
    return out


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--gb-a", type=float, default=23.0)
    ap.add_argument("--gb-b", type=float, default=9.5)
    a = ap.parse_args()
    ta, tb = tensors(a.gb_a), tensors(a.gb_b)
    move(tb[:2])  # CUDA context and allocator warm
    res: dict[str, object] = {"gb_a": a.gb_a, "gb_b": a.gb_b, "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["a_alone_s"] = timed(lambda: move(ta))
    torch.cuda.empty_cache()
    res["b_alone_s"] = timed(lambda: move(tb))
    torch.cuda.empty_cache()

    def both() -> None:
        side = torch.cuda.Stream()
        th = threading.Thread(target=move, args=(tb, side))
        th.start()
        move(ta)
        th.join()

    res["both_overlapped_s"] = timed(both)
    res["sequential_sum_s"] = round(res["a_alone_s"] + res["b_alone_s"], 3)  # type: ignore[operator]
    print(json.dumps(res))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
