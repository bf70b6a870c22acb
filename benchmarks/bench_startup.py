"""Process start -> first image, through the public API and through the CLI, with a breakdown (issue 13).

    python -m benchmarks.bench_startup --out DIR [--work DIR] [--runs api_cold,api_warm,cli_cold,cli_warm,api_disk_cold]
                                       [--budget SECONDS] [--tiny]

Setup (the issue's): a full-size Flux.1-dev pipeline with random weights (transformer 12B, T5-XXL, CLIP-L,
VAE, all bf16; built on the GPU by ``bench_engine.build_pipeline``) saved as a diffusers folder in
``--work``, and one rank-64 LoRA on the 418 attention/MLP layers (diffusers format). Every scenario is a
fresh ``python3`` process with the engine's defaults (on an H200: fp8, regional compile, fused):

- ``api_*``: this module's ``--child`` mode: import, ``registry.get_engine(ModelSource.from_diffusers(..),
  EngineOptions(compile_cache_dir=...))``, ``engine.generate(request, LoRA)``, a second image;
- ``cli_*``: ``python3 -m fastlora_core generate --model ... --lora ... --repeat 2``, which writes
  ``timings.json`` itself.

``cold``: an empty compile cache folder of the scenario's own; ``warm``: the same folder again (a restart).
``api_warm_ordinary`` (any API run with the ``_ordinary`` suffix): the same, but the engine reads every
weight on the CPU as it did before decision 29 (no direct read to the GPU), for a comparison in one call.
``api_warm_serial``: the direct reads start after diffusers' import and the checks, as before decision 37.
``api_warm_noidle``: the loader blocks on unfinished reads instead of importing the compiler and checking
the fp8 swap kernels meanwhile, as before decision 42 (that work then falls on the first LoRA and image).
``api_warm_nodefer``: the checks import torchao (which imports Dynamo) before the weights' reads start, as
before decision 43, instead of trusting the record of an earlier process's import and leaving the import to
the wait. The child's ``idle_tasks_s`` says which tasks ran while the loader waited and for how long,
``first_swap`` splits the first LoRA (file read, staging on the GPU, the whole swap); ``first_calls_ahead_s``
is how long the encoders' and VAE's first calls took on their own thread (decision 55; null where not made).
``_profile`` and ``_importtime`` (API runs): the child under ``cProfile`` or ``python -X importtime``, for
where the time goes (``VARIANTS``). ``_cudnnfp8``: the engine with ``attention="cudnn_fp8"`` (its first
image compiles the blocks with the FP8 attention op; the steady image compares with ``api_warm``).
``_threads1``: ``TORCHINDUCTOR_COMPILE_THREADS=1`` (no pool of compile workers). ``_plaincompile``:
``FASTLORA_PRECOMPILE=0`` (plain regional ``torch.compile``, the blocks re-traced in every process, as
before decision 40; its first run after other runs still compiles its own graphs). ``_bgcompile``:
``FASTLORA_BACKGROUND_COMPILE=1`` (decision 41: a block class without a saved graph is compiled by a worker
process while the images run uncompiled; ``saved_blocks`` counts the graphs loaded from workers and the
uncompiled block calls). ``_diffusers``:
diffusers' and transformers' classes instead of FastLoRA's own modules (as before decision 39). The
API child imports what a script using the API imports (torch and the pack); the engine's loader builds
FastLoRA's own modules (decision 39), or imports diffusers and transformers in its ``read`` phase
(``_diffusers``).
``api_disk_cold``: warm compile cache, but first an attempt to drop the model's files from the page cache
(``/proc/sys/vm/drop_caches``, then ``posix_fadvise(DONTNEED)`` per file); whether it worked is measured
(read throughput of the largest file before and after), not assumed.
``settle`` (a step, not a run): ``sync`` and wait until no other process is busy and the dirty pages are
written (``host_state.settle``); every run also records the host's state just before it (``host_before``:
dirty and under-writeback memory, load, busy processes), since a run right after a cold one may share the
host with its leftovers.

Recorded per run: wall time from launch to exit, the child's own process age at its first image (process
start -> first image), the breakdown (interpreter + early imports, heavy imports, the engine's phases from
``FluxEngine.timings``: checks, setup, read, masters, t5, transformer (quantisation + transfer), move_rest,
first_lora, compile_setup, first_image), the steady image (the median of ``--steady-images`` images
after the first, API runs; one by default), and ``compile_est`` = first image - steady image. JSON saved
after every run. ``--tiny``: the tiny random model on the CPU (compile off), for the CPU test of this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import host_state

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("api_cold", "api_warm", "cli_cold", "cli_warm", "api_disk_cold")  # a warm run follows its cold one
#: Suffixes of API runs: ``_ordinary`` (weights read on the CPU, as before decision 29), ``_serial``
#: (the direct reads after diffusers' import and the checks, as before decision 37), ``_noidle`` (no imports
#: while waiting for a read, as before decision 42), ``_nodefer`` (torchao imported by the checks before the
#: reads start, as before decision 43), ``_profile``
#: (the child under cProfile: ``child.prof``; its times are inflated), ``_importtime`` (``python -X
#: importtime``: ``importtime.txt``), ``_cudnnfp8`` (``attention="cudnn_fp8"``), ``_threads1``
#: (``TORCHINDUCTOR_COMPILE_THREADS=1``: inductor loads its cached kernels in the process, without
#: starting its pool of compile workers), ``_diffusers`` (diffusers' and transformers' classes, as
#: before decision 39), ``_plaincompile`` (``FASTLORA_PRECOMPILE=0``: no saved blocks, as before decision 40),
#: ``_bgcompile`` (``FASTLORA_BACKGROUND_COMPILE=1``: missing block graphs compiled by worker processes while
#: the first images run uncompiled, decision 41; use ``--steady-images 3`` to see when the graphs arrive),
#: ``_torchaoproj`` (the single blocks' output projection left to torchao, as before decision 44),
#: ``_onecompiler`` (``FASTLORA_BACKGROUND_COMPILE=0``: both block classes compiled in the serving process,
#: as before decision 45), ``_parts`` (each image timed by part, synchronised: text encoding, every
#: transformer step, VAE decode; ``image_parts`` in the child's JSON: where a first image's excess lies),
#: ``_noptune`` (inductor's ``triton.autotune_pointwise`` off in the run's processes, its compile workers
#: included: ``site_noptune/sitecustomize.py``; one launch configuration per pointwise kernel),
#: ``_noprewarm`` (no compile worker started while the weights are read: as before decision 46),
#: ``_noexpected`` (no graphs compiled for the expected first request while the weights are read: one worker
#: gets ready and the compiles start at the first image, as before decision 47), ``_latestart`` (decision 47's
#: workers started by the engine after the registry's checks, not before them), ``_threads8``
#: (``TORCHINDUCTOR_COMPILE_THREADS=8``: smaller pools of compile processes, e.g. for two workers on 16 cores),
#: ``_othersize`` (every image 1344x768 instead of 1024x1024: not the expected first request of decision 47).
#: ``_othertree`` (the child runs the code of ``--other-tree``, another checkout: a before/after pair of
#: one change in one call, on one host, with one model folder).
#: ``_pyspy`` (the child sampled by ``py-spy record --threads --idle``, 250 Hz, from outside the process:
#: ``pyspy.txt``, collapsed stacks per thread, for where a start's serial Python goes; py-spy on the PATH).
#: ``_pdl`` (``TORCHINDUCTOR_ENABLE_PDL=1``: inductor's Triton kernels launched with programmatic dependent
#: launch, Hopper and later, a loop lever; in a compile cache of its own, ``cache-api-pdl``, so that its cold
#: run leaves the default runs' saved graphs in place: pair ``api_cold_pdl`` with ``api_cold`` first).
#: Suffixes combine: ``api_cold_othersize_noexpected``.
VARIANTS = ("ordinary", "serial", "noidle", "nodefer", "profile", "importtime", "cudnnfp8", "threads1", "diffusers", "plaincompile",
            "bgcompile", "torchaoproj", "onecompiler", "parts", "noptune", "noprewarm", "noexpected", "latestart", "threads8",
            "othersize", "othertree", "pyspy", "pdl")
#: ``_othersize``'s image size (width, height): a common Flux size other than the default.
OTHER_SIZE = (1344, 768)
PROMPT = "a photo of a red fox in a snowy forest, golden hour"


def request_kwargs(tiny: bool, othersize: bool = False) -> dict[str, Any]:
    if tiny:
        return {"steps": 2, "width": 48 if othersize else 64, "height": 64, "max_sequence_length": 16}
    width, height = OTHER_SIZE if othersize else (1024, 1024)
    return {"steps": 28, "width": width, "height": height}


def split_variants(mode: str) -> tuple[str, set[str]]:
    """A run's mode (``cold``, ``warm``, ``disk_cold``) and its variant suffixes, in any number."""
    variants: set[str] = set()
    while (v := next((v for v in VARIANTS if mode.endswith(f"_{v}")), None)) is not None:
        variants.add(v)
        mode = mode.removesuffix(f"_{v}")
    return mode, variants


def tiny_options() -> dict[str, Any]:
    return {"device": "cpu", "dtype": "float32", "compile": "off"}


# -- the child: one process from start to its second image ---------------------------------------------
def child(model: str, lora: str, cache: str, out: str, tiny: bool, ordinary: bool = False,
          serial: bool = False, attention: str = "auto", steady: int = 1, classes: bool = False,
          noidle: bool = False, nodefer: bool = False, torchaoproj: bool = False, parts: bool = False,
          noprewarm: bool = False, noexpected: bool = False, latestart: bool = False,
          othersize: bool = False) -> None:
    from fastlora_core.timings import process_age

    started = process_age()
    t0 = time.perf_counter()
    # What a script using the API imports; diffusers and transformers are imported by the engine's
    # loader (in its "read" phase) while the weights are read in the background (decision 37).
    import torch

    from fastlora_core import loading, registry
    from fastlora_core.loading import direct
    from fastlora_core.specs import EngineOptions, GenerateRequest, LoraStack, ModelSource

    imports_s = time.perf_counter() - t0
    direct_reads: list[float] = []  # seconds of each file read straight to the device (decision 29)
    read_tensors = direct.read_tensors

    def timed_read(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return read_tensors(*args, **kwargs)
        finally:
            direct_reads.append(round(time.perf_counter() - t, 3))

    direct.read_tensors = timed_read
    idle_work: list[float] = []  # seconds of work done while waiting for a read (decision 42)
    do_idle_work = direct._do_idle_work

    def timed_idle_work(until: Any) -> None:
        pending, t = bool(direct._idle) and direct.IDLE_WORK and not until.is_set(), time.perf_counter()
        do_idle_work(until)
        if pending:
            idle_work.append(round(time.perf_counter() - t, 3))

    direct._do_idle_work = timed_idle_work
    read_waits: list[float] = []  # seconds the loader spent in each wait for a background read, idle work included
    take = direct.BackgroundReads.take

    def timed_take(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return take(self, *args, **kwargs)
        finally:
            read_waits.append(round(time.perf_counter() - t, 3))

    direct.BackgroundReads.take = timed_take  # type: ignore[method-assign]
    idle_tasks: dict[str, float] = {}  # each task's seconds, from the loader's log line

    class IdleTasks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.endswith("while waiting for a read: %.2f s"):
                idle_tasks[str(record.args[0])] = round(float(record.args[1]), 3)  # type: ignore[index]

    direct.logger.addHandler(IdleTasks())
    direct.logger.setLevel(logging.INFO)
    if nodefer:  # the checks import torchao (and Dynamo with it) before the reads start, as before decision 43
        from fastlora_core import deps

        deps.TRUST_RECORDS = False
    if torchaoproj:  # the single blocks' output projection left to torchao, as before decision 44
        from fastlora_core import fp8_projection

        fp8_projection.install = lambda transformer, device: 0
    if noprewarm:  # the compilers start at the first image's compile, as before decision 46
        from fastlora_core.engine import FluxEngine

        FluxEngine._first_image_compiles = lambda self: False  # type: ignore[method-assign]
    if noexpected or latestart:  # no compile workers started before the checks
        from fastlora_core import registry as registry_module

        registry_module.workers_before_checks = lambda source, options: None
    if noexpected:  # the compiles start at the first image, as before decision 47
        from fastlora_core.engine import FluxEngine

        FluxEngine._compile_expected = lambda self, source: []  # type: ignore[method-assign]
    if noidle:  # no work while waiting for a read, as before decision 42
        direct.IDLE_WORK = False
    if serial:  # the reads after the imports and checks, as before decision 37, for a same-call comparison
        direct.BACKGROUND = False
    load_pipeline = loading.load_pipeline
    if ordinary:  # the way before decision 29, for a comparison in the same call: everything read on the CPU
        loading.load_pipeline = lambda source, dtype, device=None, on_device=(), own_modules=False: load_pipeline(
            source, dtype, own_modules=own_modules and not classes)
    elif classes:  # diffusers' and transformers' classes, as before decision 39
        loading.load_pipeline = lambda source, dtype, device=None, on_device=(), own_modules=False: load_pipeline(
            source, dtype, device, on_device, own_modules=False)
    options = EngineOptions(compile_cache_dir=cache, attention=attention,  # type: ignore[arg-type]
                            **(tiny_options() if tiny else {}))
    engine = registry.get_engine(ModelSource.from_diffusers(model), options)
    stack = LoraStack.of((lora, 1.0))
    image_parts = time_parts(engine) if parts else None
    first = engine.generate(GenerateRequest(prompt=PROMPT, seed=0, **request_kwargs(tiny, othersize)), stack)
    age = process_age()
    later = [engine.generate(GenerateRequest(prompt=PROMPT, seed=1 + i, **request_kwargs(tiny, othersize)), stack)
             for i in range(steady)]
    result = {
        "process_start_to_main_s": round(started, 3) if started is not None else None,
        "imports_s": round(imports_s, 3), "engine": engine.timings, "direct_read_s": direct_reads,
        "idle_work_s": idle_work, "idle_tasks_s": idle_tasks, "read_waits_s": read_waits,
        "first_swap": engine.last_swap.as_dict() if engine.last_swap is not None else None,
        "first_calls_ahead_s": engine.first_calls_ahead_s,
        "process_start_to_first_image_s": round(age, 3) if age is not None else None,
        "first_image_compiles": first.new_compiles, "steady_image_s": [round(r.seconds, 3) for r in later],
        "saved_blocks": vars(engine.precompiled.stats) if engine.precompiled is not None else None,
        "device": str(engine.device), "options": repr(engine.options),
        "fused_projections": getattr(engine, "fused_projections", None),
        "image_parts": image_parts,
        "compile_times": compile_times(),
        "inductor_pdl": inductor_pdl(),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    Path(out).write_text(json.dumps(result, indent=2))


def inductor_pdl() -> bool | None:
    """Whether inductor generated programmatic-dependent-launch code in this process (``_pdl``), or None
    where this torch has no such setting or inductor was never imported."""
    if "torch._inductor.config" not in sys.modules:
        return None
    import torch._inductor.config as inductor_config

    return getattr(inductor_config.triton, "enable_pdl", None)


def compile_times() -> dict[str, str] | None:
    """Dynamo's and inductor's seconds per compile step in this process (``compile_times``: tracing,
    lowering, code generation, waiting for the Triton compile workers...), or None without a compile."""
    if "torch._dynamo.utils" not in sys.modules:
        return None
    from torch._dynamo.utils import compile_times as times

    names, values = times(repr="csv")  # type: ignore[misc]
    return dict(zip(names, values)) or None


def time_parts(engine: Any) -> list[dict[str, Any]]:
    """Time every image of ``engine`` by part (``_parts``): text encoding, each transformer step and the
    VAE decode, each ended by a device synchronisation (so the parts add up to the image, less the
    launch-ahead they forbid). Returns the list the images' records are appended to."""
    import torch

    images: list[dict[str, Any]] = []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    pipe, clock = engine.pipe, {"t": 0.0}

    def timed(part: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                if part == "encode_s":
                    images.append({"steps_s": []})
                images[-1][part] = round(time.perf_counter() - t, 4)
        return run

    def step_start(module: Any, args: Any, kwargs: Any) -> None:
        sync()
        clock["t"] = time.perf_counter()

    def step_end(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        sync()
        images[-1]["steps_s"].append(round(time.perf_counter() - clock["t"], 4))

    pipe.encode_prompt = timed("encode_s", pipe.encode_prompt)
    pipe.vae.decode = timed("decode_s", pipe.vae.decode)
    engine.transformer.register_forward_pre_hook(step_start, with_kwargs=True)
    engine.transformer.register_forward_hook(step_end, with_kwargs=True)
    return images


# -- the parent --------------------------------------------------------------------------------------
#: What the start-up path imports (a priming process imports it; every module it loaded is then
#: byte-compiled, as ``pip install`` would have done).
PRIME_IMPORTS = ("import torch, torch._dynamo, torch._inductor.compile_fx, diffusers, transformers, safetensors\n"
                 "from diffusers import FluxPipeline\n"
                 "from transformers import CLIPTokenizer, T5TokenizerFast\n"
                 "import fastlora_core.cli, fastlora_core.engine, fastlora_core.loading, fastlora_core.registry\n")
#: Packages compiled whole: they import more modules later (compiling, quantising, generating).
LAZY_PACKAGES = ("torch", "triton", "torchao", "diffusers", "peft")
PRIME_REPORT = f"""
import json, sys
files = sorted({{m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}})
roots = sorted({{p for name in {LAZY_PACKAGES!r} if name in sys.modules for p in sys.modules[name].__path__}})
print(json.dumps({{"files": files, "roots": roots}}))
"""


def cache_bytecode(work: Path) -> dict[str, Any]:
    """Give the runs the byte-code cache a normal install has (``--bytecode cached``).

    ``pip install`` byte-compiles every module it installs, so a user's Python loads ``.pyc`` files.
    The device image sets ``PYTHONDONTWRITEBYTECODE=1`` and its packages (and the wheels carried with
    ``--no-compile``) have none, so each process there compiled every imported module from source:
    8.8 s of ``compile`` in a warm start (cProfile, 2026-12-04). Here the runs get
    ``PYTHONPYCACHEPREFIX`` (a folder of this benchmark's own: nothing is written into the packages), and
    every module the start-up path imports, plus every module of the packages they belong to, is compiled
    into it first, by a priming process, and ``LAZY_PACKAGES`` whole. The runs may write byte code for what
    was missed."""
    import compileall
    import py_compile

    prefix = work / "pycache"
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = str(prefix)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", PRIME_IMPORTS + PRIME_REPORT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"mode": "cached", "error_tail": proc.stderr[-2000:]}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for f in found["files"]:
        if f.endswith(".py"):
            try:
                py_compile.compile(f, doraise=True)
            except (py_compile.PyCompileError, OSError):
                pass
    for root in found["roots"]:
        compileall.compile_dir(root, quiet=2, workers=os.cpu_count() or 1)
    return {"mode": "cached", "prefix": str(prefix), "modules": len(found["files"]), "packages": found["roots"],
            "seconds": round(time.perf_counter() - t0, 1)}


def prepare(work: Path, tiny: bool, res: dict[str, Any]) -> tuple[Path, Path]:
    """The diffusers folder and the LoRA file (made once per work folder)."""
    model, lora = work / "model", work / "lora_r64.safetensors"
    if (model / "model_index.json").exists() and lora.exists():
        return model, lora
    t0 = time.perf_counter()
    if tiny:
        from fastlora_core.tiny import write_tiny_loras, write_tiny_model

        write_tiny_model(model)
        src = write_tiny_loras(work / "loras", names=["fastlora-tiny-wide"])["fastlora-tiny-wide"]
        shutil.copy(src, lora)
    else:
        import torch
        from safetensors.torch import save_file

        from .bench_engine import build_pipeline
        from .fullsize import make_lora, target_names

        pipe = build_pipeline()
        res["build_random_s"] = round(time.perf_counter() - t0, 1)
        low = make_lora(pipe.transformer, target_names(pipe.transformer), 64, 1)
        sd = {}
        for n, (down, up) in low.items():
            sd[f"transformer.{n}.lora_A.weight"] = down.contiguous().cpu()
            sd[f"transformer.{n}.lora_B.weight"] = up.contiguous().cpu()
        save_file(sd, str(lora))
        pipe.save_pretrained(str(model), max_shard_size="50GB")
        del pipe, low, sd
        torch.cuda.empty_cache()
    res["prepare_s"] = round(time.perf_counter() - t0, 1)
    res["model_bytes"] = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    return model, lora


def read_rate(path: Path, limit: int = 4 << 30) -> float:
    """GB/s reading up to ``limit`` bytes of ``path`` (page cache or disk, whichever serves it)."""
    t0, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while n < limit:
            chunk = f.read(64 << 20)
            if not chunk:
                break
            n += len(chunk)
    return round(n / (time.perf_counter() - t0) / 1e9, 2)


def drop_page_cache(model: Path) -> dict[str, Any]:
    """Try to evict the model's files from the page cache; measure whether it worked."""
    largest = max((f for f in model.rglob("*.safetensors")), key=lambda f: f.stat().st_size)
    out: dict[str, Any] = {"file": str(largest.relative_to(model)), "read_gbps_before": read_rate(largest)}
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        out["drop_caches"] = "ok"
    except OSError as exc:
        out["drop_caches"] = f"{type(exc).__name__}: {exc}"
    for f in model.rglob("*.safetensors"):
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            out["fadvise"] = "ok"
        except (OSError, AttributeError) as exc:
            out["fadvise"] = f"{type(exc).__name__}: {exc}"
    out["read_gbps_after"] = read_rate(largest)
    for f in model.rglob("*.safetensors"):  # evict again: the probe above read the largest file back in
        try:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            pass
    return out


def breakdown(child_json: dict[str, Any]) -> dict[str, Any]:
    """The child's numbers as one flat row: every part, and what no phase covers."""
    eng = child_json["engine"]
    parts = {"start_and_early_imports": child_json.get("process_start_to_main_s") or 0.0,
             "imports": child_json["imports_s"], "checks": eng.get("checks", 0.0), "engine_setup": eng.get("setup", 0.0)}
    for k in ("read", "masters", "t5", "transformer", "move_rest"):
        parts[k] = eng.get(k, 0.0)
    parts["build_other"] = max(0.0, eng["build"] - sum(eng.get(k, 0.0) for k in
                                                        ("read", "masters", "t5", "transformer", "move_rest")))
    parts["first_lora"] = eng.get("first_lora", 0.0)
    parts["compile_setup"] = eng.get("compile_setup", 0.0)
    steady = statistics.median(child_json["steady_image_s"]) if child_json["steady_image_s"] else 0.0
    parts["compile_est"] = max(0.0, eng.get("first_image", 0.0) - steady)
    parts["image"] = min(steady, eng.get("first_image", 0.0))
    total = child_json.get("process_start_to_first_image_s")
    row = {k: round(v, 2) for k, v in parts.items()}
    row["process_start_to_first_image_s"] = total
    row["unaccounted"] = round(total - sum(parts.values()), 2) if total is not None else None
    row["steady_image_s"] = steady
    return row


def run_one(name: str, model: Path, lora: Path, work: Path, out: Path, tiny: bool, timeout: float,
            steady: int = 1, other_tree: Path | None = None) -> dict[str, Any]:
    kind, _, mode = name.partition("_")
    mode, variants = split_variants(mode)
    if variants and kind != "api":
        return {"skipped": "the variants exist for API runs only"}
    root = ROOT
    if "othertree" in variants:
        if other_tree is None:
            return {"skipped": "_othertree needs --other-tree"}
        root = other_tree
    cache = work / (f"cache-{kind}-pdl" if "pdl" in variants else f"cache-{kind}")
    if mode == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    res: dict[str, Any] = {"cache": "cold" if mode == "cold" else "warm"}
    if mode == "disk_cold":
        res["page_cache"] = drop_page_cache(model)
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if kind == "api":
        result = run_dir / "timings.json"
        python = [sys.executable]
        if "profile" in variants:
            python += ["-m", "cProfile", "-o", str(run_dir / "child.prof")]
        if "importtime" in variants:
            python = [sys.executable, "-X", "importtime"]
        if "pyspy" in variants:  # sampled from outside: no profiler overhead in the child's own threads
            python = [shutil.which("py-spy") or "py-spy", "record", "--format", "raw", "--rate", "250", "--threads",
                      "--idle", "--nonblocking", "-o", str(run_dir / "pyspy.txt"), "--", sys.executable]
        cmd = python + ["-m", "benchmarks.bench_startup", "--child", str(model), str(lora), str(cache),
                        str(result)] + (["--tiny"] if tiny else []) + [f"--{v}" for v in ("ordinary", "serial", "noidle", "nodefer", "cudnnfp8", "diffusers",
                                                                                                  "torchaoproj", "parts", "noprewarm", "noexpected", "latestart",
                                                                                                  "othersize")
                                                                         if v in variants] + [f"--steady={steady}"]
    else:
        result = run_dir / "timings.json"
        req = request_kwargs(tiny)
        cmd = [sys.executable, "-m", "fastlora_core", "generate", "--model", str(model), "--lora", f"{lora}:1.0",
               "--prompt", PROMPT, "--steps", str(req["steps"]), "--width", str(req["width"]),
               "--height", str(req["height"]), "--repeat", "2", "--compile-cache-dir", str(cache),
               "--out", str(run_dir)]
        if tiny:
            cmd += ["--device", "cpu", "--dtype", "float32", "--compile", "off"]
    res["command"] = " ".join(cmd)
    res["code"] = str(root)
    # The cache home (decision 43's import records) and Triton's own kernel cache (FastLoRA's fp8 swap
    # kernels, compiled outside inductor) go with the compile cache: cold runs have none of them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FASTLORA_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if "threads1" in variants:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    if "threads8" in variants:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "8"
    if "plaincompile" in variants:
        env["FASTLORA_PRECOMPILE"] = "0"
    if "bgcompile" in variants:
        env["FASTLORA_BACKGROUND_COMPILE"] = "1"
    if "onecompiler" in variants:
        env["FASTLORA_BACKGROUND_COMPILE"] = "0"
    if "pdl" in variants:
        env["TORCHINDUCTOR_ENABLE_PDL"] = "1"
    if "noptune" in variants:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks" / "site_noptune"), env["PYTHONPATH"]])
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        res["error_tail"] = f"killed after {timeout:.0f} s (budget): {str(exc.stdout or '')[-1500:]}"
        return res
    res["wall_s"] = round(time.time() - t0, 2)
    res["rc"] = proc.returncode
    if "importtime" in variants:
        (run_dir / "importtime.txt").write_text(proc.stderr)
    if proc.returncode != 0 or not result.exists():
        res["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return res
    child_json = json.loads(result.read_text())
    res["child"] = child_json
    res["breakdown"] = breakdown(child_json)
    return res


def host_speed() -> dict[str, Any]:
    """The host's CPU, and how fast it runs Python on one core. Most of a start is Python on one core
    (imports, module construction, Dynamo's tracing), and the device tool's hosts differ by about 2x in
    it (RESULTS.md, 2026-12-05 evening), so each call records this beside its start-up numbers:
    ``python_probe_s`` is the best of 5 runs of a fixed pure-Python loop, ``import_json_probe_s`` of
    parsing a fixed JSON document (allocation-heavy, like building modules)."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass

    def best(fn) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times), 4)

    doc = json.dumps([{"name": f"layer{i}", "shape": [i, 3072], "dtype": "bf16"} for i in range(20000)])
    return {"cpu_model": model, "cpus": os.cpu_count(),
            "python_probe_s": best(lambda: sum(i * i % 7 for i in range(2_000_000))),
            "import_json_probe_s": best(lambda: json.loads(doc))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        args = sys.argv[2:]
        steady = [int(a.split("=", 1)[1]) for a in args if a.startswith("--steady=")]
        child(*args[:4], tiny="--tiny" in args, ordinary="--ordinary" in args, serial="--serial" in args,
              noidle="--noidle" in args, nodefer="--nodefer" in args, attention="cudnn_fp8" if "--cudnnfp8" in args else "auto", steady=steady[0] if steady else 1,
              classes="--diffusers" in args, torchaoproj="--torchaoproj" in args, parts="--parts" in args,
              noprewarm="--noprewarm" in args, noexpected="--noexpected" in args, latestart="--latestart" in args,
              othersize="--othersize" in args)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/fastlora-startup")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--budget", type=float, default=560, help="seconds for the whole script, its preparation (model folder, byte code) included; a run is skipped when too little is left")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steady-images", type=int, default=1,
                    help="images after the first in API runs (their median is the steady image)")
    ap.add_argument("--bytecode", choices=("cached", "as-is"), default="cached",
                    help="cached: the runs load byte code as after pip install (cache_bytecode); as-is: whatever "
                         "this Python does (the device image compiles every module from source in every process)")
    ap.add_argument("--other-tree", type=Path, default=None,
                    help="another checkout of this repository, the code of the runs named with _othertree")
    a = ap.parse_args()
    deadline = time.time() + a.budget
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_startup",
                                                *sys.argv[1:]]), "runs": {}}
    try:
        import diffusers
        import torch

        res["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        import torchao

        res["versions"]["torchao"] = torchao.__version__
    except ImportError:
        pass
    res["host"] = host_speed()
    print(json.dumps({"host": res["host"]}), flush=True)
    save = lambda: (out / "startup.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    model, lora = prepare(work, a.tiny, res)
    res["bytecode"] = cache_bytecode(work) if a.bytecode == "cached" else {
        "mode": "as-is", "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "PYTHONPYCACHEPREFIX": os.environ.get("PYTHONPYCACHEPREFIX")}
    if a.other_tree is not None and a.bytecode == "cached":
        import compileall

        for package in ("fastlora_core", "benchmarks"):  # what a run imports from a checkout, as for ROOT above
            compileall.compile_dir(a.other_tree / package, quiet=2, workers=os.cpu_count() or 1)
    save()
    need = 30 if a.tiny else 75  # a cold run on the H200 took ~50 s before this script existed
    for name in a.runs.split(","):
        key = name if name not in res["runs"] else f"{name}#{sum(k.split('#')[0] == name for k in res['runs']) + 1}"
        left = deadline - time.time()
        if left < need:
            res["runs"][key] = {"skipped": f"budget: {left:.0f} s left"}
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
        if name == "settle":
            res["runs"][key] = host_state.settle()
            print(json.dumps(res["runs"][key]), flush=True)
            save()
            continue
        host = host_state.snapshot()
        res["runs"][key] = run_one(name, model, lora, work, out, a.tiny, timeout=left, steady=a.steady_images,
                                   other_tree=a.other_tree)
        res["runs"][key]["host_before"] = host
        print(json.dumps(res["runs"][key].get("breakdown") or res["runs"][key].get("error_tail")), flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
