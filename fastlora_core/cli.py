"""Command line: ``python -m fastlora_core {demo,generate,write-tiny}``.

- ``demo``: builds a tiny random-weight Flux and random LoRAs in a temporary folder (no download),
  runs the engine end to end with both swap strategies, prints a summary and writes images and
  ``summary.json`` into ``--out``.
- ``generate``: real weights (a diffusers folder or ComfyUI single files) and LoRAs.
- ``write-tiny``: write the tiny model and LoRAs into a folder or a ComfyUI ``models/`` tree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .errors import FastLoraError
from .specs import (
    ATTENTIONS,
    COMPILE_MODES,
    DTYPES,
    OFFLOADS,
    QUANTIZATIONS,
    SWAP_STRATEGIES,
    T5_QUANTIZATIONS,
    EngineOptions,
    GenerateRequest,
    LoraSpec,
    LoraStack,
    ModelSource,
)

logger = logging.getLogger("fastlora_core")


def _save_images(images, folder: Path, stem: str) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = (img.numpy() * 255).round().clip(0, 255).astype("uint8")
        path = folder / (f"{stem}.png" if len(images) == 1 else f"{stem}_{i}.png")
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def _add_engine_options(p: argparse.ArgumentParser, defaults: EngineOptions) -> None:
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=defaults.quantization)
    p.add_argument("--t5-quantization", choices=T5_QUANTIZATIONS, default=defaults.t5_quantization)
    p.add_argument("--attention", choices=ATTENTIONS, default=defaults.attention)
    p.add_argument("--compile", choices=COMPILE_MODES, default=defaults.compile)
    p.add_argument("--offload", choices=OFFLOADS, default=defaults.offload)
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--swap-strategy", choices=SWAP_STRATEGIES, default=defaults.swap_strategy)
    p.add_argument("--max-rank", type=int, default=defaults.max_rank)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--compile-cache-dir", default="")
    p.add_argument("--deterministic", action="store_true",
                   help="same request, same image in every process (slower: see EngineOptions.deterministic)")


def _options_from(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        quantization=args.quantization, t5_quantization=args.t5_quantization,
        attention=args.attention, compile=args.compile, offload=args.offload, dtype=args.dtype,
        swap_strategy=args.swap_strategy, max_rank=args.max_rank, device=args.device,
        compile_cache_dir=args.compile_cache_dir, deterministic=args.deterministic,
    )


def parse_lora_arg(text: str) -> LoraSpec:
    """``FILE`` or ``FILE:STRENGTH``."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return LoraSpec.of(path, float(strength))
        except ValueError:
            pass
    return LoraSpec.of(text, 1.0)


# -- demo -----------------------------------------------------------------------------------------
def run_demo(out: Path, compile_mode: str = "regional", strategies: tuple[str, ...] = ("fused", "adapter"),
             steps: int = 2, size: int = 64) -> dict[str, object]:
    import torch

    from . import registry
    from .reference import reference_images
    from .tiny import write_tiny_loras, write_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fastlora-demo-"))
    t0 = time.perf_counter()
    model_dir = write_tiny_model(tmp / "model")
    loras = {k: str(v) for k, v in write_tiny_loras(tmp / "loras").items()}
    source = ModelSource.from_diffusers(model_dir)
    request = GenerateRequest(prompt="a tiny red fox", seed=42, steps=steps, width=size, height=size,
                              max_sequence_length=32)
    style, character, wide = (loras["fastlora-tiny-style"], loras["fastlora-tiny-character"],
                              loras["fastlora-tiny-wide"])
    sequence: list[tuple[str, LoraStack]] = [
        ("no LoRA", LoraStack()),
        ("style (rank 4, attention)", LoraStack.of((style, 1.0))),
        ("character (rank 8, attention+MLP)", LoraStack.of((character, 1.0))),
        ("wide (rank 16, every block layer)", LoraStack.of((wide, 1.0))),
        ("stack: style 1.0 + character 0.7", LoraStack.of((style, 1.0), (character, 0.7))),
        ("style at strength 0.5", LoraStack.of((style, 0.5))),
        ("back to style 1.0", LoraStack.of((style, 1.0))),
    ]
    ref_cache: dict[LoraStack, torch.Tensor] = {}
    summary: dict[str, object] = {
        "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "compile": compile_mode, "request": request.__dict__, "runs": [],
    }
    total_recompiles = 0
    for strategy in strategies:
        options = EngineOptions(dtype="float32", device="cpu", compile=compile_mode,  # type: ignore[arg-type]
                                swap_strategy=strategy, max_rank=32)  # type: ignore[arg-type]
        engine = registry.get_engine(source, options)
        slot = None
        if strategy == "adapter":
            slot = engine.prepare_slot([style, character, wide])
        t = time.perf_counter()
        warm = engine.generate(request)
        first_image_s = time.perf_counter() - t
        run: dict[str, object] = {"strategy": strategy, "load_s": round(engine.load_seconds, 3),
                                  "first_image_s": round(first_image_s, 3),
                                  "warmup_compiles": warm.new_compiles, "slot": slot, "swaps": []}
        swaps: list[dict[str, object]] = run["swaps"]  # type: ignore[assignment]
        for label, stack in sequence:
            result = engine.generate(request, stack)
            if stack not in ref_cache:
                ref_cache[stack] = reference_images(source, stack, request)
            diff = float((result.images - ref_cache[stack]).abs().max())
            base_diff = float((result.images - ref_cache.get(LoraStack(), result.images)).abs().max())
            total_recompiles += result.new_compiles
            swap = result.swap
            swaps.append({
                "label": label, "strategy": strategy, "stack": stack.describe(),
                "swap_ms": round(swap.swap_ms, 3) if swap else 0.0,
                "new_compiles": result.new_compiles, "max_abs_diff": diff,
                "lora_effect": base_diff, "sample_s": round(result.seconds, 3),
                "images": _save_images(result.images, out, f"{strategy}_{len(swaps):02d}"),
            })
        if strategy == "adapter":
            refused = loras["fastlora-tiny-single"]
            before = engine.generate(request).images
            try:
                engine.apply(LoraStack.of((refused, 1.0)))
                run["refused"] = {"file": Path(refused).name, "error": None}
            except FastLoraError as exc:
                after = engine.generate(request).images
                run["refused"] = {"file": Path(refused).name, "error": str(exc),
                                  "unchanged_after_refusal": bool(torch.equal(before, after))}
        run["engine_compiles"] = engine.compiles
        summary["runs"].append(run)  # type: ignore[attr-defined]
        registry.release_all()
    summary["recompiles"] = total_recompiles
    summary["tolerance"] = 1e-4
    summary["all_within_tolerance"] = all(
        s["max_abs_diff"] <= 1e-4 for r in summary["runs"] for s in r["swaps"]  # type: ignore[attr-defined]
    )
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_demo_summary(summary: dict[str, object], out: Path) -> None:
    w = sys.stdout.write
    w(f"\nFastLoRA demo (tiny random Flux on {summary['device']}, compile={summary['compile']})\n")
    for run in summary["runs"]:  # type: ignore[attr-defined]
        w(f"\nstrategy={run['strategy']}: load {run['load_s']} s, first image {run['first_image_s']} s "
          f"({run['warmup_compiles']} graphs compiled)\n")
        w(f"  {'swap':<38} {'swap_ms':>8} {'compiles':>8} {'max_abs_diff':>13} {'lora_effect':>11}\n")
        for s in run["swaps"]:
            w(f"  {s['label']:<38} {s['swap_ms']:>8.2f} {s['new_compiles']:>8} {s['max_abs_diff']:>13.2e} "
              f"{s['lora_effect']:>11.4f}\n")
        if run.get("refused"):
            r = run["refused"]
            w(f"  refused {r['file']}: {r['error']}\n  image unchanged after refusal: "
              f"{r.get('unchanged_after_refusal')}\n")
    w(f"\nrecompiles: {summary['recompiles']}   all max_abs_diff <= {summary['tolerance']}: "
      f"{summary['all_within_tolerance']}   total {summary['total_s']} s\n")
    w(f"images and summary.json in {out}/\n")


# -- generate --------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace, started_s: float | None = None, t_main: float | None = None) -> int:
    """Generate, then write ``timings.json`` beside the images: where the time from process start to
    the first image went (``started_s``: the process's age when ``main`` began, i.e. the interpreter's
    start-up and this module's imports; then the heavy imports, the engine's phases, the first image).
    ``t_main``: ``perf_counter`` when ``main`` began: the imports are counted from there. diffusers and
    transformers are imported by the engine's loader, in its ``read`` phase, while the weights are
    read in the background (decision 37)."""
    t_imports = t_main if t_main is not None else time.perf_counter()
    from . import registry
    from .timings import process_age

    imports_s = time.perf_counter() - t_imports
    if args.model:
        source = ModelSource.from_diffusers(args.model)
    else:
        source = ModelSource.from_single_files(args.transformer, args.clip_l, args.t5xxl, args.vae,
                                               args.tokenizers)
    engine = registry.get_engine(source, _options_from(args))
    stack = LoraStack(tuple(parse_lora_arg(x) for x in args.lora))
    request = GenerateRequest(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              width=args.width, height=args.height, batch=args.batch)
    out = Path(args.out)
    result = engine.generate(request, stack)
    age = process_age()
    timings: dict[str, object] = {
        "process_start_to_main_s": round(started_s, 3) if started_s is not None else None,
        "imports_s": round(imports_s, 3), "engine": engine.timings,
        "process_start_to_first_image_s": round(age, 3) if age is not None else None,
        "first_image_compiles": result.new_compiles, "device": str(engine.device), "options": repr(engine.options),
    }
    paths = _save_images(result.images, out, f"fastlora_{args.seed}")
    logger.info("%d image(s) in %.2f s (compiles: %d): %s", len(paths), result.seconds,
                result.new_compiles, ", ".join(paths))
    steady = []
    for extra in range(1, args.repeat):
        result = engine.generate(GenerateRequest(**{**request.__dict__, "seed": args.seed + extra}), stack)
        steady.append(round(result.seconds, 3))
        paths += _save_images(result.images, out, f"fastlora_{args.seed + extra}")
        logger.info("image %d in %.2f s (compiles: %d)", extra + 1, result.seconds, result.new_compiles)
    timings["steady_image_s"] = steady
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    logger.info("start-up: %s s from process start to the first image (timings.json)",
                timings["process_start_to_first_image_s"])
    return 0


def run_write_tiny(args: argparse.Namespace) -> int:
    from .tiny import write_comfy_tree, write_tiny_loras, write_tiny_model

    folder = Path(args.folder)
    if args.comfy:
        manifest = write_comfy_tree(folder)
    else:
        manifest = {"diffusers": str(write_tiny_model(folder / "fastlora-tiny-flux")),
                    "loras": {k: str(v) for k, v in write_tiny_loras(folder / "loras").items()}}
    sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
    return 0


#: Environment defaults that quiet diffusers' and transformers' notices and progress bars (tqdm reads
#: ``TQDM_DISABLE`` since 4.66) without importing them here: ``generate`` lets the engine's loader
#: import them while the weights are read (decision 37). Values the user set are kept.
QUIET_ENVIRONMENT = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def _quiet_libraries() -> None:
    """diffusers/transformers progress bars and notices would drown the summary."""
    import warnings

    for noisy in ("torch", "diffusers", "transformers", "torchao", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastlora_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="end-to-end demo on a tiny random model (default)")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--compile", choices=COMPILE_MODES, default="regional")
    demo.add_argument("--strategies", default="fused,adapter")

    gen = sub.add_parser("generate", help="generate with real Flux weights")
    src = gen.add_argument_group("model (a diffusers folder, or the four single files)")
    src.add_argument("--model", help="diffusers Flux folder (with model_index.json)")
    src.add_argument("--transformer")
    src.add_argument("--clip-l")
    src.add_argument("--t5xxl")
    src.add_argument("--vae")
    src.add_argument("--tokenizers", help="folder with clip/ and t5/ tokenizers, or a ComfyUI checkout")
    gen.add_argument("--lora", action="append", default=[], help="FILE[:STRENGTH], repeatable (a stack)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=3.5)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--repeat", type=int, default=1, help="images with consecutive seeds (shows warm speed)")
    gen.add_argument("--out", default="fastlora-output")
    _add_engine_options(gen, EngineOptions())

    tiny = sub.add_parser("write-tiny", help="write the tiny model and LoRAs (install smoke tests)")
    tiny.add_argument("folder")
    tiny.add_argument("--comfy", action="store_true",
                      help="FOLDER is a ComfyUI models/ dir: write diffusers/fastlora-tiny-flux and loras/")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .timings import process_age

    started_s, t_main = process_age(), time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    demo = args.command in (None, "demo")
    level = logging.DEBUG if args.verbose else (logging.WARNING if demo else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        if args.command in (None, "demo"):
            out = Path(getattr(args, "out", "demo-output"))
            strategies = tuple(getattr(args, "strategies", "fused,adapter").split(","))
            summary = run_demo(out, getattr(args, "compile", "regional"), strategies)
            print_demo_summary(summary, out)
            ok = summary["recompiles"] == 0 and summary["all_within_tolerance"]
            return 0 if ok else 1
        if args.command == "generate":
            if not args.model and not all((args.transformer, args.clip_l, args.t5xxl, args.vae)):
                parser.error("give --model DIR or --transformer, --clip-l, --t5xxl and --vae")
            return run_generate(args, started_s, t_main)
        if args.command == "write-tiny":
            return run_write_tiny(args)
    except FastLoraError as exc:
        logger.error("%s", exc)
        return 2
    parser.print_help()
    return 2
