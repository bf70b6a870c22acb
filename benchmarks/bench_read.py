"""Reading the transformer's safetensors straight onto the GPU vs the ordinary way (issue 13).

    python -m benchmarks.bench_read OUT.json [--work DIR] [--bfl] [--tiny]

The ordinary way reads with ``from_pretrained`` into CPU memory and then copies every tensor to the
GPU with a pageable ``.to``. The engine's direct way (``fastlora_core.loading.direct``, decision
29) reads each file's bytes with ``os.preadv`` by several threads into two pinned chunks that
alternate, each chunk sent with asynchronous copies into one GPU allocation per tensor. This
measures, for the transformer alone (random full-size Flux.1-dev, bf16, in the page cache):

- ``today``: ``FluxTransformer2DModel.from_pretrained`` on the CPU, then every tensor ``.to(cuda)``;
- ``direct``, ``direct_again``: ``load_pipeline(ModelSource(diffusers_dir=WORK, transformer_only=True),
  bf16, device=cuda)``, the engine's loader (the folder written by ``save_pretrained``,
  or the one ``bench_startup`` wrote when ``--work`` is its folder);
- with ``--bfl``: the same weights also written as one ComfyUI single file in the BFL layout and
  loaded the direct way (``direct_bfl``: the key mapping and the q/k/v splits done on the GPU).

Every result is compared with ``today``'s tensor by tensor (bitwise). ``--tiny``: the tiny model on
the CPU (ordinary memory, synchronous copies) as a smoke test of the same code. Results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fastlora_core.loading import META_AXES, diffusers_to_bfl, load_pipeline
from fastlora_core.specs import ModelSource


def read_direct(source: ModelSource, device: torch.device) -> dict[str, torch.Tensor]:
    """The engine's loader with the transformer read straight to ``device``."""
    pipe: Any = load_pipeline(source, torch.bfloat16, device=device)
    out = pipe.transformer.state_dict()
    if device.type == "cuda":
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
    ap.add_argument("--bfl", action="store_true", help="also a single BFL-layout file, read the direct way")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    folder = work / "transformer"
    device = torch.device("cpu" if a.tiny else "cuda")
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                           "device": "cpu" if a.tiny else torch.cuda.get_device_name()}
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
    source = ModelSource(diffusers_dir=str(work), transformer_only=True)
    runs = [("today", lambda: read_today(folder, device)), ("direct", lambda: read_direct(source, device)),
            ("direct_again", lambda: read_direct(source, device))]
    if a.bfl:
        runs.append(("direct_bfl", lambda: read_direct(ModelSource(transformer=str(bfl_file), transformer_only=True),
                                                       device)))
    reference: dict[str, torch.Tensor] = {}
    for name, fn in runs:
        if name == "direct_bfl":
            from safetensors.torch import save_file

            t0 = time.perf_counter()
            bfl_file = work / "flux-bfl.safetensors"
            config = json.loads((folder / "config.json").read_text())
            bfl = diffusers_to_bfl(reference, config["num_layers"], config["num_single_layers"])
            save_file({k: v.contiguous() for k, v in bfl.items()}, str(bfl_file),
                      {META_AXES: json.dumps(list(config["axes_dims_rope"]))})  # read only at head dims other than 128
            del bfl
            res["write_bfl_s"] = round(time.perf_counter() - t0, 1)
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
