"""Same seed, same image? Run-to-run differences of the engine on a full-size random Flux.1-dev (GPU).

``python benchmarks/determinism.py --out results.json`` runs four worker processes one after the
other, each building the full-size random pipeline of bench_engine.py and an engine with the default
options (fp8, regional compile, fused) plus one LoRA (rank 64, strength 0.8), then generating the
same request ``--images`` times:

- ``default-cold``: inductor's defaults, empty compile cache;
- ``default-warm``: the same in a new process on that cache;
- ``deterministic-cold`` / ``deterministic-warm``: the same under
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
  (its own cache folder). That call also turns on inductor's deterministic mode (no timing-based
  choice between kernel variants that sum in another order). Setting only
  ``torch._inductor.config.deterministic`` (or ``TORCHINDUCTOR_DETERMINISTIC=1``) does not last:
  dynamo restores the global deterministic-algorithms flag after tracing each frame
  (``torch/_dynamo/convert_frame.py``), and ``use_deterministic_algorithms`` writes that flag into
  the inductor setting, so with regional compilation only the first block class would compile in
  deterministic mode.

It reports, per mode, the max abs difference (0..1 image scale) between the images of one process
(first vs later ones, later ones among themselves) and between the two processes, and the seconds
per image of the later images (the cost of deterministic mode). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORK = Path("/tmp/fastlora-determinism")


def worker(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.bench_engine import build_pipeline, write_loras
    from fastlora_core.engine import FluxEngine
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack

    if os.environ.get("FASTLORA_BENCH_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    lora_file = WORK / "lora.json"
    if args.tiny:  # a CPU smoke test of this script
        from fastlora_core.tiny import build_tiny_pipeline, write_tiny_loras

        pipe = build_tiny_pipeline(0, torch.float32)
        for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            m.eval()
        paths = {"A64": str(write_tiny_loras(WORK / "loras", pipe.transformer)["fastlora-tiny-wide"])}
        options = EngineOptions(compile_cache_dir=args.cache, device="cpu", dtype="float32")
        size = 64
    else:
        pipe = build_pipeline()
        if not lora_file.exists():
            lora_file.write_text(json.dumps(write_loras(pipe.transformer)))
        paths = json.loads(lora_file.read_text())
        options = EngineOptions(compile_cache_dir=args.cache)
        size = 1024
    engine = FluxEngine.from_pipeline(pipe, options, label="random-flux-dev")
    stack = LoraStack.of((paths["A64"], 0.8))
    request = GenerateRequest(prompt="a photo of a cat on a red sofa", seed=7, steps=args.steps,
                              width=size, height=size, max_sequence_length=16 if args.tiny else 512)
    images, seconds = [], []
    for _ in range(args.images):
        result = engine.generate(request, stack)
        images.append(result.images)
        seconds.append(result.seconds)
    torch.save(torch.cat(images), args.worker_out)
    Path(str(args.worker_out) + ".json").write_text(json.dumps({
        "seconds": seconds, "process_s": time.perf_counter() - t0, "options": repr(engine.options),
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "inductor_deterministic": bool(getattr(torch._inductor.config, "deterministic", False)),
    }))


def max_abs(a, b) -> float:  # type: ignore[no-untyped-def]
    return float((a.float() - b.float()).abs().max())


def main(args: argparse.Namespace) -> None:
    import torch

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    report: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
                                 "images_per_process": args.images, "command": " ".join(sys.argv)}
    runs = {}
    for mode in args.modes.split(","):
        deterministic = mode == "deterministic"
        cache = str(WORK / f"cache-{mode}")
        for phase in ("cold", "warm"):
            out = WORK / f"{mode}-{phase}.pt"
            cmd = [sys.executable, __file__, "--worker", "--cache", cache, "--steps", str(args.steps),
                   "--images", str(args.images), "--worker-out", str(out)]
            cmd += ["--tiny"] if args.tiny else []
            env = os.environ | ({"FASTLORA_BENCH_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
                                if deterministic else {})
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, env=env).returncode
            if rc != 0:
                report[f"{mode}-{phase}"] = {"error": f"worker exited with {rc}"}
                Path(args.out).write_text(json.dumps(report, indent=2))
                continue
            info = json.loads(Path(str(out) + ".json").read_text())
            runs[(mode, phase)] = torch.load(out)
            imgs = runs[(mode, phase)]
            later = info["seconds"][1:]
            report[f"{mode}-{phase}"] = {
                "wall_s": round(time.perf_counter() - t0, 1),
                "first_image_s": round(info["seconds"][0], 2),
                "s_per_image_later": [round(s, 3) for s in later],
                "median_s_per_image": round(statistics.median(later), 3) if later else None,
                "first_vs_later_max_abs": [max_abs(imgs[0], imgs[i]) for i in range(1, len(imgs))],
                "later_vs_later_max_abs": [max_abs(imgs[1], imgs[i]) for i in range(2, len(imgs))],
                **{k: v for k, v in info.items() if k != "seconds"},
            }
            Path(args.out).write_text(json.dumps(report, indent=2))
        if (mode, "cold") in runs and (mode, "warm") in runs:
            a, b = runs[(mode, "cold")], runs[(mode, "warm")]
            report[f"{mode}-across_processes_max_abs"] = {
                "first_vs_first": max_abs(a[0], b[0]), "last_vs_last": max_abs(a[-1], b[-1])}
    for phase in ("warm", "cold"):  # the cost of deterministic mode, from the same phase of both modes
        med = [report.get(f"{m}-{phase}", {}).get("median_s_per_image") for m in ("default", "deterministic")]  # type: ignore[union-attr]
        if all(med):
            report["deterministic_cost_pct"] = {"phase": phase, "pct": round(100 * (med[1] / med[0] - 1), 2)}
            break
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="determinism.json")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--modes", default="default,deterministic")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test of this script)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    worker(a) if a.worker else main(a)
