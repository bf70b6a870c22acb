"""FastLoRA against ComfyUI's native Flux paths through a real ComfyUI server's HTTP API (issue 9).

    python -m benchmarks.bench_server COMFYUI_DIR --out DIR [--paths a,b,...] [--budget SECONDS] [--cycles N]
                                      [--back-to-back] [--card-gib G] [--tiny]

Models (written once into ``--work``): full-size Flux.1-dev with random bf16 weights as the single files
a ComfyUI user has (``flux1-dev.safetensors`` in BFL layout, ``clip_l``, ``t5xxl_bf16``, ``ae``; written by
``fastlora_core.loading.write_single_files`` from ``bench_engine.build_pipeline``), and rank-64 LoRAs on the
418 attention/MLP layers (diffusers format, which both ComfyUI's and FastLoRA's loaders read): A, and one B
per cycle.

Every path gets a fresh server (``main.py --listen``; the pack and ``benchmarks/server_probe`` in its
``custom_nodes``) and this sequence of queued graphs, each timed from ``POST /prompt`` to the end of its
execution (websocket): first image (LoRA A at 1.0) also timed from the server's launch; two steady images
(new sampler seeds: ComfyUI re-runs only the sampler and the decode); the image right after changing the
LoRA file (B), after changing only its strength (B at 0.6), back to A (``--cycles N``: that sequence N
times, a never-used B each time; the change rows are then medians, ``*_each_cycle_s`` the values). Each
change is compared with the mean of its own cycle's two steady images (``*_vs_steady``: the median of those
ratios), so a GPU that drifts over the run does not count as a change's cost. Then the compiled graphs
counted after the first image and the server's peak GPU memory (``/bench/stats``). 1024x1024, 28 steps, euler /
simple, CFG 1, guidance 3.5 in the conditioning; VAE decode included (``VAEDecode`` + ``PreviewImage``).

Before each image the script waits until ComfyUI's own housekeeping after the previous one has run
(``server_probe``'s ``/bench/idle``; ``settle_wait_s`` records the wait): ComfyUI's prompt worker runs a
full ``gc.collect()`` once at least 10 s have passed since the last one, so queued back to back about
every third image would carry that pause (0.25 s to 2.2 s on the paths measured, depending on how many Python objects the
server holds) whatever changed in it, and a LoRA change would be blamed for it. ``--back-to-back``
measures without waiting; ``node_seconds_each_image`` shows the gc's cost either way.

Paths:
- ``native_bf16``: ``UNETLoader`` (weight_dtype default) -> ``LoraLoaderModelOnly`` -> ``KSampler`` (the baseline);
- ``native_fp8_fast``: the same with ``weight_dtype=fp8_e4m3fn_fast``;
- ``native_fp8_fast_compile``: that plus ``TorchCompileModel`` (inductor) before the LoRA loader;
- ``ours_model``: ``OptimizedFluxLoader`` (transformer only, defaults: fp8, regional compile, fused) -> its
  MODEL -> ``LoraLoaderModelOnly`` -> ``KSampler``;
- ``ours_generate``: ``OptimizedFluxLoader`` (single files, everything) -> ``LoraHotswap`` -> ``Generate``
  (its own T5/CLIP encoding of a fixed prompt and its own VAE decode);
- ``ours_model_workflow``: the shipped ``workflows/api/flux_model_lora.json`` as a user runs it, with
  ComfyUI's own ``DualCLIPLoader`` (CLIP-L and the bf16 T5-XXL) and ``CLIPTextEncode`` instead of
  ``BenchConditioning``; each cycle also changes the prompt once (``after_prompt_change_s``), which makes
  ComfyUI load its T5 again. This is the path whose memory decisions 64 and 65 are about: with
  ``--card-gib`` it shows whether the T5 load moves the engine's masters to system RAM
  (``masters_moved_to_ram``, from the server's log) instead of unloading the engine
  (``engine_unloads``, ``engine_builds``). GPU only: ComfyUI builds CLIP-L and T5-XXL at full size;
- ``ours_model_workflow_t5fp8``: the same with the T5 stored in fp8 (``t5xxl_fp8_e4m3fn``, 4.9 GB, the
  file most ComfyUI users of smaller cards have).

``--card-gib G`` makes the server behave as on a card with ``G`` GiB: the probe caps PyTorch's allocator
(``set_per_process_memory_fraction``, which the engine's room rule reads too) and ComfyUI gets
``--reserve-vram`` (the GPU's total minus ``G``), so its own load and unload decisions see the same card.

Text conditioning for the ``KSampler`` paths comes from ``server_probe``'s ``BenchConditioning`` (cached
by ComfyUI after the first graph). ``--tiny`` runs the same on the CPU (``--cpu``) with a ComfyUI-loadable
tiny transformer, the full-size VAE, 64x64 and 2 steps (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the paths that run the shipped MODEL workflow with ComfyUI's own text encoders; those are full size,
#: so these paths are not run with ``--tiny``
WORKFLOW_PATHS = ("ours_model_workflow", "ours_model_workflow_t5fp8")
PATHS = ("ours_model", "native_bf16", "ours_generate", "native_fp8_fast", "native_fp8_fast_compile", *WORKFLOW_PATHS)
#: seconds a path needs at least (server start, load, first image, five more): skipped with less left
NEED = {"native_bf16": 100, "native_fp8_fast": 100, "native_fp8_fast_compile": 200, "ours_model": 90,
        "ours_generate": 80, "ours_model_workflow": 150,
        "ours_model_workflow_t5fp8": 150}
PROMPT = "a photo of a red fox in a snowy forest, golden hour"
#: each cycle's changed prompt (``ours_model_workflow``; the cycle's number filled in, so it is new each time)
OTHER_PROMPT = "a watercolour of a lighthouse at dawn, number {}"
RESULT: dict[str, Any] = {}
#: what the engine logs when ComfyUI's partial unload moved its masters to system RAM (decision 65)
MASTERS_MOVED = "moved the masters to system RAM"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- files -------------------------------------------------------------------------------------------
def write_loras(transformer: Any, folder: Path, rank: int, names: tuple[str, ...] = ("lora_a", "lora_b")) -> None:
    """Random diffusers-format LoRAs on the attention/MLP layers of ``transformer`` (any device)."""
    import torch
    from safetensors.torch import save_file

    from .fullsize import target_names

    folder.mkdir(parents=True, exist_ok=True)
    device = next(transformer.parameters()).device
    for seed, name in enumerate(names, start=1):
        g = torch.Generator(device=device).manual_seed(seed)
        sd = {}
        for n in target_names(transformer):
            lin = transformer.get_submodule(n)
            o, i = lin.out_features, lin.in_features
            down = torch.randn(rank, i, generator=g, device=device) / math.sqrt(i)
            up = torch.randn(o, rank, generator=g, device=device) * (0.05 / math.sqrt(3 * rank))
            sd[f"transformer.{n}.lora_A.weight"] = down.to(torch.bfloat16).cpu().contiguous()
            sd[f"transformer.{n}.lora_B.weight"] = up.to(torch.bfloat16).cpu().contiguous()
        save_file(sd, str(folder / f"{name}.safetensors"))


def lora_names(prefix: str, cycles: int) -> tuple[str, ...]:
    """A and one never-used LoRA per cycle: ``prefix_a``, ``prefix_b``, ``prefix_b2`` ..."""
    return (f"{prefix}_a", f"{prefix}_b", *(f"{prefix}_b{k}" for k in range(2, cycles + 1)))


def prepare(work: Path, tiny: bool, cycles: int = 1) -> dict[str, Any]:
    """The models tree; returns the file names each graph uses."""
    models = work / "models"
    marker = models / "ready.json"
    if marker.exists():
        files = json.loads(marker.read_text())
        if len(files["loras"]) >= cycles + 1:
            return files
        shutil.rmtree(models)  # written for fewer cycles
    t0 = time.perf_counter()
    flat = models / "flux"
    import torch

    from fastlora_core.loading import write_single_files, write_t5_file

    if tiny:
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        from fastlora_core.loading import load_shipped_config
        from fastlora_core.tiny import (
            COMFY_TINY_TRANSFORMER_CONFIG,
            COMFY_TINY_TRANSFORMER_NAME,
            TINY_DIFFUSERS_NAME,
            build_tiny_pipeline,
            write_comfy_tiny_transformer,
            write_tiny_model,
        )

        write_comfy_tiny_transformer(flat / COMFY_TINY_TRANSFORMER_NAME)
        torch.manual_seed(0)
        write_loras(FluxTransformer2DModel(**COMFY_TINY_TRANSFORMER_CONFIG), models / "loras", rank=4,
                    names=lora_names("lora", cycles))
        pipe = build_tiny_pipeline(0)
        write_tiny_model(models / "diffusers" / TINY_DIFFUSERS_NAME)
        write_loras(pipe.transformer, models / "loras", rank=4, names=lora_names("tiny_gen", cycles))
        # the real Flux autoencoder's shape (random weights): ComfyUI's VAELoader / VAEDecode on our file
        pipe.vae = AutoencoderKL(**{k: v for k, v in load_shipped_config("ae").items() if not k.startswith("_")})
        vae = write_single_files(pipe, models / "tmp")["vae"]
        shutil.move(str(vae), str(flat / "ae.safetensors"))
        shutil.rmtree(models / "tmp")
        files = {"transformer": COMFY_TINY_TRANSFORMER_NAME, "vae": "ae.safetensors", "diffusers": TINY_DIFFUSERS_NAME,
                 "gen_loras": [f"{n}.safetensors" for n in lora_names("tiny_gen", cycles)]}
    else:
        from .bench_engine import build_pipeline

        pipe = build_pipeline()
        RESULT["build_random_s"] = round(time.perf_counter() - t0, 1)
        write_loras(pipe.transformer, models / "loras", rank=64, names=lora_names("lora", cycles))
        out = write_single_files(pipe, flat)
        t5_fp8 = write_t5_file(pipe.text_encoder_2, flat, torch.float8_e4m3fn)  # as ComfyUI's fp8 T5 file
        del pipe
        torch.cuda.empty_cache()
        files = {k: Path(v).name for k, v in out.items() if k != "tokenizer_dir"}
        files["t5xxl_fp8"] = t5_fp8.name
        files["gen_loras"] = [f"{n}.safetensors" for n in lora_names("lora", cycles)]
    files["loras"] = [f"{n}.safetensors" for n in lora_names("lora", cycles)]
    RESULT["prepare_s"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(files))
    return files


# -- graphs ------------------------------------------------------------------------------------------
def loader_inputs(**kw: Any) -> dict[str, Any]:
    """OptimizedFluxLoader's inputs as the shipped MODEL workflow has them (transformer only), with ``kw``
    changed."""
    graph = json.loads((ROOT / "workflows" / "api" / "flux_model_lora.json").read_text())
    inputs = next(n["inputs"] for n in graph.values() if n["class_type"] == "OptimizedFluxLoader")
    return {**inputs, **kw}


def workflow_graph(files: dict[str, Any], lora: str, strength: float, seed: int, prompt: str,
                   t5: str = "t5xxl") -> dict[str, Any]:
    """The shipped MODEL workflow (``flux_model_lora``) with this run's files (``t5``: which T5 file), LoRA,
    seed and prompt; its ``SaveImage`` becomes a ``PreviewImage`` as in the other paths. Every other input
    stays as shipped."""
    graph = json.loads((ROOT / "workflows" / "api" / "flux_model_lora.json").read_text())
    names = {"transformer": files["transformer"], "clip_name1": files["clip_l"], "clip_name2": files[t5],
             "vae_name": files["vae"], "lora_name": lora, "strength_model": strength, "seed": seed}
    encoders = [n for n in graph.values() if n["class_type"] == "CLIPTextEncode" and n["inputs"]["text"]]
    if len(encoders) != 1:
        raise ValueError(f"flux_model_lora.json: expected one CLIPTextEncode with a prompt, found {len(encoders)}")
    encoders[0]["inputs"]["text"] = prompt
    for node in graph.values():
        node["inputs"].update({k: v for k, v in names.items() if k in node["inputs"]})
        if node["class_type"] == "SaveImage":
            node["class_type"], node["inputs"] = "PreviewImage", {"images": node["inputs"]["images"]}
    return graph


def graph_for(path: str, files: dict[str, Any], lora: str, strength: float, seed: int, tiny: bool,
              prompt: str = PROMPT) -> dict[str, Any]:
    size, steps = (64, 2) if tiny else (1024, 28)
    if path in WORKFLOW_PATHS:
        return workflow_graph(files, lora, strength, seed, prompt, "t5xxl_fp8" if path.endswith("t5fp8") else "t5xxl")
    if path == "ours_generate":
        src = ({"source": "diffusers folder", "diffusers_model": files["diffusers"]} if tiny else
               {"source": "single files", "transformer": files["transformer"], "clip_l": files["clip_l"],
                "t5xxl": files["t5xxl"], "vae": files["vae"]})
        extra = {"quantization": "none", "compile": "off", "dtype": "float32"} if tiny else {}
        basic = json.loads((ROOT / "workflows" / "api" / "flux_lora_basic.json").read_text())
        loader = {**next(n["inputs"] for n in basic.values() if n["class_type"] == "OptimizedFluxLoader"),
                  **src, **extra}
        return {
            "1": {"class_type": "OptimizedFluxLoader", "inputs": loader},
            "2": {"class_type": "LoraHotswap", "inputs": {"engine": ["1", 0], "lora_name": lora, "strength": strength}},
            "3": {"class_type": "Generate", "inputs": {"engine": ["2", 0], "prompt": PROMPT, "seed": seed,
                                                       "steps": steps, "guidance": 3.5, "width": size,
                                                       "height": size, "batch": 1}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        }
    if path == "ours_model":
        extra = {"quantization": "none", "compile": "off", "dtype": "float32"} if tiny else {}
        model: dict[str, Any] = {"class_type": "OptimizedFluxLoader",
                                 "inputs": loader_inputs(transformer=files["transformer"], **extra)}
        model_out: list[Any] = ["1", 1]
    else:
        dtype = "default" if path == "native_bf16" else "fp8_e4m3fn_fast"
        model = {"class_type": "UNETLoader", "inputs": {"unet_name": files["transformer"], "weight_dtype": dtype}}
        model_out = ["1", 0]
    graph: dict[str, Any] = {"1": model}
    if path == "native_fp8_fast_compile":
        graph["12"] = {"class_type": "TorchCompileModel", "inputs": {"model": model_out, "backend": "inductor"}}
        model_out = ["12", 0]
    tokens = 8 if tiny else 512
    graph.update({
        "6": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model_out, "lora_name": lora,
                                                              "strength_model": strength}},
        "3": {"class_type": "BenchConditioning", "inputs": {"seed": 1, "tokens": tokens, "guidance": 3.5}},
        "4": {"class_type": "BenchConditioning", "inputs": {"seed": 2, "tokens": tokens, "guidance": 3.5}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["7", 0], "seed": seed, "steps": steps,
                                                   "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                                                   "denoise": 1.0}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    })
    return graph


# -- the server --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ComfyUI server in its own process, with the pack and the probe in ``custom_nodes``."""

    def __init__(self, comfy_dir: Path, work: Path, tiny: bool, card_gib: float | None = None) -> None:
        from fastlora_core import headless

        base = work / "server"
        shutil.rmtree(base / "custom_nodes", ignore_errors=True)
        custom = base / "custom_nodes"
        custom.mkdir(parents=True)
        (custom / "ComfyUI-FastLoRA").symlink_to(ROOT, target_is_directory=True)
        shutil.copytree(ROOT / "benchmarks" / "server_probe", custom / "fastlora_bench_probe")
        (base / "user").mkdir(parents=True, exist_ok=True)
        front = base / "frontend"  # the web UI is not needed; ComfyUI serves this folder instead
        front.mkdir(exist_ok=True)
        (front / "index.html").write_text("<html><body>FastLoRA benchmark server</body></html>\n")
        models = work / "models"
        config = base / "extra_model_paths.yaml"
        config.write_text(f"fastlora_bench:\n  base_path: {models}\n  diffusion_models: flux\n  text_encoders: flux\n"
                          f"  vae: flux\n  loras: loras\n  diffusers: diffusers\n  custom_nodes: {custom}\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        extra = env.pop("FASTLORA_BENCH_PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [extra, env.get("PYTHONPATH", "")] if p)
        self.port = free_port()
        self.log_path = base / f"comfyui-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--front-end-root", str(front), "--output-directory", str(base / "output"),
               "--user-directory", str(base / "user"), "--extra-model-paths-config", str(config)]
        if tiny:
            cmd.append("--cpu")
        elif card_gib:  # a smaller card: the probe caps the allocator, ComfyUI reserves the rest
            import torch

            total_gib = torch.cuda.mem_get_info()[1] / 2**30
            env["FASTLORA_BENCH_CARD_GIB"] = str(card_gib)
            cmd += ["--reserve-vram", f"{max(0.0, total_gib - card_gib):.2f}"]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = headless.Client(f"127.0.0.1:{self.port}", timeout=120)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.tail()}")
            try:
                self.client.request("GET", "/system_stats")
                break
            except headless.HeadlessError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start in 300 s: {self.tail()}") from None
                time.sleep(0.5)
        self.ready_s = round(time.perf_counter() - self.started, 2)

    def tail(self, n: int | None = 4000) -> str:
        """The server's log: its last ``n`` characters, or all of it (``None``)."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if n is None else text[-n:]

    def run(self, graph: dict[str, Any]) -> tuple[float, Any]:
        from fastlora_core import headless

        t0 = time.perf_counter()
        result = headless.run_workflow(self.client, graph, None, on_event=lambda e: None, timeout=900)
        return round(time.perf_counter() - t0, 3), result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bench_path(path: str, comfy_dir: Path, work: Path, files: dict[str, Any], tiny: bool, save: Any,
               out: Path, settle: bool = True, cycles: int = 1, card_gib: float | None = None) -> None:
    """Run the image sequence on ``path`` in a fresh server; results into ``RESULT[path]``, the server's
    log into ``out/<path>-server.log``."""
    res: dict[str, Any] = RESULT.setdefault(path, {})
    loras = files["gen_loras"] if path == "ours_generate" else files["loras"]
    try:
        server = Server(comfy_dir, work, tiny, card_gib)
    except RuntimeError as exc:
        res["error"] = str(exc)[-4000:]
        save()
        return
    res["server_ready_s"] = server.ready_s
    try:
        def image(lora: str, strength: float, seed: int, prompt: str = PROMPT) -> tuple[float, Any]:
            if settle:  # ComfyUI's periodic gc.collect() first (see the module doc)
                waited = time.perf_counter()
                while server.client.request("GET", "/bench/idle")["housekeeping_pending"] \
                        and time.perf_counter() - waited < 15:
                    time.sleep(0.1)
                res.setdefault("settle_wait_s", []).append(round(time.perf_counter() - waited, 2))
            seconds, result = server.run(graph_for(path, files, lora, strength, seed, tiny, prompt))
            res.setdefault("node_seconds_each_image", []).append(server.client.request("GET", "/bench/nodes"))
            if path.startswith("ours"):  # where a LoRA change's time went: read, stage, write
                fl = server.client.request("GET", "/fastlora/stats")
                engines = fl.get("engines") or [{}]
                res.setdefault("last_swap_after_each_image", []).append(engines[0].get("last_swap"))
                # decisions 64 / 65: ComfyUI's memory manager and the engine, counted after each image
                res.setdefault("engine_builds_after_each_image", []).append(fl.get("builds"))
                res.setdefault("engine_unloads_after_each_image", []).append(fl.get("unloads"))
                res.setdefault("masters_moved_to_ram_after_each_image", []).append(
                    server.tail(None).count(MASTERS_MOVED))
            return seconds, result

        a = loras[0]
        res["first_image_s"], first = image(a, 1.0, 0)
        res["server_start_to_first_image_s"] = round(time.perf_counter() - server.started, 2)
        res["first_executed"] = sorted(first.executed)
        save()
        c0 = server.client.request("GET", "/bench/stats")["compiled_graphs"]
        res["steady_s"] = []
        each: dict[str, list[float]] = {"after_lora_change_s": [], "after_strength_change_s": [], "back_to_A_s": []}
        prompts = path in WORKFLOW_PATHS  # a new prompt each cycle: ComfyUI encodes it, loading its T5 again
        if prompts:
            each["after_prompt_change_s"] = []
        ratios: dict[str, list[float]] = {k: [] for k in each}
        for cycle in range(cycles):  # steady, steady, a LoRA file never used before, its strength, back to A(, prompt)
            b, seed = loras[1 + cycle], 10 * cycle
            steady_pair = [image(a, 1.0, seed + 1)[0], image(a, 1.0, seed + 2)[0]]
            res["steady_s"] += steady_pair
            seconds, changed = image(b, 1.0, seed + 3)
            each["after_lora_change_s"].append(seconds)
            res["after_lora_change_executed"] = sorted(changed.executed)
            each["after_strength_change_s"].append(image(b, 0.6, seed + 4)[0])
            each["back_to_A_s"].append(image(a, 1.0, seed + 5)[0])
            if prompts:
                each["after_prompt_change_s"].append(image(a, 1.0, seed + 6, OTHER_PROMPT.format(cycle))[0])
            for key in each:  # against this cycle's own steady images: drift between cycles cancels
                ratios[key].append(each[key][-1] / statistics.mean(steady_pair) - 1)
        for key, values in each.items():  # one cycle: its number; several: their median, and each
            res[key] = statistics.median(values)
            res[key.removesuffix("_s") + "_vs_steady"] = round(statistics.median(ratios[key]), 4)
            if cycles > 1:
                res[key.removesuffix("_s") + "_each_cycle_s"] = values
                res[key.removesuffix("_s") + "_vs_steady_each_cycle"] = [round(r, 4) for r in ratios[key]]
        stats = server.client.request("GET", "/bench/stats")
        res["compiles_after_first_image"] = stats["compiled_graphs"] - c0
        res["compiled_graphs_total"] = stats["compiled_graphs"]
        res["peak_allocated_gib"] = stats["peak_allocated_gib"]
        res["peak_reserved_gib"] = stats["peak_reserved_gib"]
        if path.startswith("ours"):
            fl = server.client.request("GET", "/fastlora/stats")
            res["engine"] = {k: fl["engines"][0].get(k) for k in ("compiles", "source", "options", "timings")} \
                if fl.get("engines") else None
    except Exception as exc:  # noqa: BLE001 - a failed path is a result; the next path still runs
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        res["log_tail"] = server.tail()
    finally:
        server.stop()
        shutil.copyfile(server.log_path, out / f"{path}-server.log")
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("comfy_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/fastlora-server-bench")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--budget", type=float, default=560)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cycles", type=int, default=1,
                    help="repeat steady x2 / new LoRA file / strength / back to A this many times (a new file each)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="queue each image as soon as the previous one ends (ComfyUI's periodic gc lands in them)")
    ap.add_argument("--card-gib", type=float, default=None,
                    help="behave as on a card with this many GiB (allocator cap and ComfyUI's --reserve-vram)")
    a = ap.parse_args()
    deadline = time.time() + a.budget
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    RESULT.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "command": " ".join(["python3", "-m", "benchmarks.bench_server", *sys.argv[1:]]),
                   "torch": torch.__version__,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "card_gib": a.card_gib})
    commit = subprocess.run(["git", "-C", a.comfy_dir, "rev-parse", "HEAD"], capture_output=True, text=True) \
        if Path(a.comfy_dir, ".git").exists() else subprocess.CompletedProcess([], 0, "")  # a copy: no commit
    version = Path(a.comfy_dir, "comfyui_version.py")
    RESULT["comfyui"] = (commit.stdout.strip() or "no git") + " " + (
        version.read_text().strip().split("=")[-1].strip(' "\'') if version.exists() else "")
    try:
        import diffusers
        import torchao

        RESULT.update(diffusers=diffusers.__version__, torchao=torchao.__version__)
    except ImportError:
        pass

    def save() -> None:
        (out / "server.json").write_text(json.dumps(RESULT, indent=1))

    log("writing models")
    files = prepare(work, a.tiny, a.cycles)
    save()
    for path in a.paths.split(","):
        left = deadline - time.time()
        if a.tiny and path in WORKFLOW_PATHS:
            RESULT[path] = {"skipped": "full size only: ComfyUI builds CLIP-L and T5-XXL at full size"}
            save()
            continue
        if left < (20 if a.tiny else NEED[path] + 55 * (a.cycles - 1)):  # a cycle: 5 images of ~10 s with settling
            RESULT[path] = {"skipped": f"budget: {left:.0f} s left"}
            save()
            continue
        log(path)
        bench_path(path, Path(a.comfy_dir), work, files, a.tiny, save, out, not a.back_to_back, a.cycles,
                   a.card_gib)
        log(json.dumps({k: v for k, v in RESULT[path].items() if k != "log_tail"})[:1500])
    save()


if __name__ == "__main__":
    main()
