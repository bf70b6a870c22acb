"""Compile a missing block graph in a worker process (decisions 41, 45-47).

With a cold compile cache the first image of a process waits for the two Flux block classes to compile
(10.6 s of a 25.7 s start on the H200, RESULTS.md). A block class whose graph is neither loaded nor
saved can be handed to a worker process, which saves the graph where
:class:`~.precompile.PrecompiledBlocks` looks; the serving process then loads it, exactly as a restarted
process would. Two ways to use the worker (:func:`mode`):

- ``"ahead"`` (the default on a GPU with ample room, decision 45): while the serving process compiles
  the first block class it meets, a worker compiles the other one; that class's blocks wait for the
  worker's graph. Every image is compiled, so the same request repeats bit for bit from the first image,
  and the two compilations overlap (cold start 29.65 -> 26.01 s on an H100, 2026-12-05).
- ``"ahead"`` from the start (decision 47): when the first image will certainly compile, one worker per
  block class compiles the expected first request's graph from a specimen it builds itself
  (:mod:`.expected_compile`, :meth:`BackgroundCompiler.expect`) while the serving process reads the
  weights; the worker announces the file's name, and blocks asking for that name wait for it.
- ``"eager"`` (``FASTLORA_BACKGROUND_COMPILE=1``, decision 41): every missing class goes to a worker and
  the blocks run uncompiled (slower per image, the same weights) until their graph arrives. The first
  image comes sooner (14.3 s instead of 23.9 s on the H200), but the uncompiled images differ slightly
  from the compiled ones; for starts that are always cold (serverless without a persisted cache).

The worker gets the block's *structure*, not its weights: the module tree as a pickle in which every
tensor is a :class:`TensorSpec` (class, shape, strides, storage offset, dtype, a quantised tensor's
inner tensors and layout). It builds random weights of that structure on the same device, checks that
the block's fingerprint equals the one the serving process sent (so the file lands under the name the
serving process will look for), compiles and saves with the same code a restarted process uses. A
worker that cannot do any of this (a block it cannot rebuild, an out-of-memory, a crash) reports
failure and the serving process compiles the block itself, as it would without this module.

Not used with ``deterministic=True`` (the first image must equal the later ones, decision 41), without a
saved-block folder, or on a GPU without ample room (one more process and CUDA context has not been
measured against a 24 or 16 GB card's total; ``FASTLORA_BACKGROUND_COMPILE=0`` switches it off
everywhere).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import importlib
import importlib.util
import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .timings import Phases, process_age

logger = logging.getLogger(__name__)

#: ``FASTLORA_BACKGROUND_COMPILE=1``: missing graphs compiled by workers while their blocks run eagerly
#: (decision 41); ``0``: no workers at all; unset: workers compile ahead where the GPU has ample room
#: (decision 45).
ENV_SWITCH = "FASTLORA_BACKGROUND_COMPILE"


def mode(ample_room: bool) -> str | None:
    """How workers help a cold start: ``"eager"`` (the user's ``1``: the blocks run uncompiled until
    their graph arrives), ``"ahead"`` (by default on a GPU with ample room: while the serving process
    compiles the first block class, a worker compiles the other, and its blocks wait for it, so every
    image is compiled), or None (``0``, or a GPU without ample room: one more process and CUDA context
    is not measured against a 24 or 16 GB card's total). A value other than ``1`` / ``0`` is logged
    and means the default."""
    value = os.environ.get(ENV_SWITCH, "").strip()
    if value not in ("", "0", "1"):
        logger.warning("%s=%r is neither 1 nor 0: the default applies", ENV_SWITCH, value)
        value = ""
    if value == "1":
        return "eager"
    if value == "" and ample_room:
        return "ahead"
    return None


# --------------------------------------------------------------------------------------------------
# A block without its weights
# --------------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    """Everything about a tensor a trace depends on, without its data: enough to build a random
    tensor that Dynamo, inductor and the block's fingerprint cannot tell from the original."""

    cls: type
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    requires_grad: bool
    parameter: bool
    inference: bool  # an inference tensor (Dynamo guards its dispatch keys)
    inner: dict[str, TensorSpec] | None = None  # a tensor subclass's inner tensors (__tensor_flatten__)
    ctx: Any = None
    base: TensorSpec | None = None  # a view's base (Dynamo guards a view's base with dynamic shapes)

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        flatten = getattr(t, "__tensor_flatten__", None)
        is_param = isinstance(t, torch.nn.Parameter)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, ctx = flatten()
            inner = {n: cls.of(getattr(t, n)) for n in names}
            return cls(type(t), tuple(t.shape), tuple(t.stride()), 0, t.dtype, t.requires_grad, is_param,
                       t.is_inference(), inner, ctx)
        base = cls.of(t._base) if t._base is not None else None
        return cls(torch.Tensor, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype,
                   t.requires_grad, is_param, t.is_inference(), base=base)

    def build(self, device: torch.device) -> torch.Tensor:
        with torch.inference_mode(self.inference):
            return self._build(device)

    def _build(self, device: torch.device) -> torch.Tensor:
        if self.inner is not None:
            inner = {n: s.build(device) for n, s in self.inner.items()}
            unflatten = getattr(self.cls, "__tensor_unflatten__")  # noqa: B009 (a protocol method, not on type)
            t = unflatten(inner, self.ctx, self.size, self.stride)
        elif self.base is not None:
            t = self.base.build(device).as_strided(self.size, self.stride, self.offset)
        elif self.offset == 0:
            t = torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=device)
            _fill(t)
        else:  # a slice that keeps no base (made in inference mode): a slice of a buffer of its own
            extent = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
            flat = torch.empty(self.offset + extent, dtype=self.dtype, device=device)
            _fill(flat)
            t = flat.as_strided(self.size, self.stride, self.offset)
        if self.parameter:
            return torch.nn.Parameter(t, requires_grad=self.requires_grad)
        return t.requires_grad_(self.requires_grad) if self.requires_grad else t


def _fill(t: torch.Tensor) -> None:
    """Small random values (scales and weights alike; only shapes matter to a compile, but random
    data keeps inductor's benchmarking of kernel variants honest)."""
    if t.is_floating_point():
        t.copy_(torch.randn(t.shape, device=t.device).mul_(0.05))
    else:
        t.zero_()


def _specs(value: Any) -> Any:
    """Tensors in nested tuples, lists and dicts replaced by their :class:`TensorSpec`."""
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_specs(v) for v in value)
    if isinstance(value, dict):
        return {k: _specs(v) for k, v in value.items()}
    return value


def _built(value: Any, device: torch.device) -> Any:
    if isinstance(value, TensorSpec):
        return value.build(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_built(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _built(v, device) for k, v in value.items()}
    return value


def skeleton(block: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``block`` whose parameters and buffers are :class:`TensorSpec` (no weight is copied),
    without the dispatcher that routes its calls."""
    memo: dict[int, Any] = {}
    for module in block.modules():
        for holder in (module._parameters, module._buffers):
            for tensor in holder.values():
                if tensor is not None:
                    memo[id(tensor)] = TensorSpec.of(tensor)
        route = module.__dict__.get("_compiled_call_impl")
        if route is not None:
            memo[id(route)] = None
    return copy.deepcopy(block, memo)


def rebuild(block: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Random weights of the recorded structure, on ``device`` (in place of :func:`skeleton`'s specs)."""
    for module in block.modules():
        for holder in (module._parameters, module._buffers):
            for name, value in holder.items():
                if isinstance(value, TensorSpec):
                    holder[name] = value.build(device)
    return block


# --------------------------------------------------------------------------------------------------
# The serving process's side
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One block class's graph being compiled by a worker."""

    block: str
    path: str  # where the serving process will look for the file ("" until announced, decision 47)
    done: threading.Event = field(default_factory=threading.Event)
    # set once ``path`` is known: at once for a hand-over, when the worker names the file it compiles
    # for the expected first request (decision 47), or when the job ends
    announced: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    error: str = ""
    seconds: float = 0.0
    # wall-clock moments (``time.time()``): the worker's start, its being ready, the announcement and
    # the reply; with the serving process's age at the worker's start (``timeline``)
    times: dict[str, float] = field(default_factory=dict)
    ready_steps: dict[str, float] = field(default_factory=dict)  # seconds of each of the worker's first steps
    #: seconds of each step before an expected job's announcement (decision 47): the specimen's ``build``,
    #: ``quantise`` and ``finish`` (the engine's steps after quantisation), and ``inputs`` (the first step's
    #: and then the blocks')
    specimen_steps: dict[str, float] = field(default_factory=dict)

    def timeline(self) -> dict[str, Any]:
        """When the worker started (seconds after the serving process did) and, counted from then,
        when it was ready, announced its file and replied (GET /fastlora/stats, the benchmarks)."""
        start = self.times.get("worker_started")
        out: dict[str, Any] = {"block": self.block, "seconds": round(self.seconds, 3), "ready_steps": self.ready_steps}
        if self.specimen_steps:
            out["specimen_steps"] = self.specimen_steps
        if start is not None:
            out["worker_started_s"] = self.times.get("worker_started_age")
            out.update({f"{k}_s": round(v - start, 3) for k, v in self.times.items()
                        if k in ("ready", "announced", "finished")})
        return out

    def __post_init__(self) -> None:
        if self.path:
            self.announced.set()

    def finish(self, ok: bool, error: str = "", seconds: float = 0.0) -> None:
        self.ok, self.error, self.seconds = ok, error, seconds
        self.announced.set()
        self.done.set()


class _Worker:
    """One worker process: jobs as JSON lines on its stdin, replies as JSON lines on its stdout (inside
    the worker, anything else printed to stdout goes to stderr: inductor and Triton may print)."""

    def __init__(self, device: torch.device) -> None:
        package = __name__.rpartition(".")[0]
        package_dir = Path(__file__).resolve().parent
        env = dict(os.environ, **{ENV_SWITCH: "0"})
        self.started, self.started_age = time.time(), process_age()
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, package, str(package_dir), str(device)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.jobs: dict[int, Job] = {}  # sent, not yet answered (the reader thread removes them)
        assert self.process.stdout is not None
        self._replies = self.process.stdout
        self._reader = threading.Thread(target=self._read, name="fastlora-compile-worker", daemon=True)
        self._reader.start()

    def send(self, number: int, job: Job, message: dict[str, Any]) -> None:
        job.times["worker_started"] = self.started
        if self.started_age is not None:
            job.times["worker_started_age"] = round(self.started_age, 3)
        self.jobs[number] = job
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def _read(self) -> None:
        for line in self._replies:
            try:
                reply = json.loads(line.decode("utf-8", "replace"))
                if "announce" in reply:  # the file a job for the expected request compiles (decision 47)
                    job = self.jobs[reply["id"]]
                    job.times.update(ready=float(reply["ready"]), announced=float(reply["at"]))
                    job.ready_steps = dict(reply.get("steps", {}))
                    job.specimen_steps = dict(reply.get("specimen", {}))
                    job.path = str(reply["announce"])
                    job.announced.set()
                    continue
                job = self.jobs.pop(reply["id"])
                job.times.update(ready=float(reply["ready"]), finished=float(reply["at"]))
                job.ready_steps = dict(reply.get("steps", {}))
            except (ValueError, KeyError):
                logger.warning("compile worker: unreadable reply %r", line[:200])
                continue
            ok, error = bool(reply["ok"]), str(reply.get("error", ""))
            if ok and reply.get("path") != job.path:
                ok, error = False, (f"the worker saved {reply.get('path')} but this process looks for {job.path} "
                                    "(its software or device key differs)")
            job.finish(ok, error, float(reply["seconds"]))
        code = self.process.wait()
        for job in self.jobs.values():  # a worker that died mid-job
            job.finish(False, f"the compile worker exited with code {code} before replying")
        self.jobs.clear()

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def close(self) -> None:
        """Ask the worker to exit once its jobs are done (end of its input)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass


class BackgroundCompiler:
    """Worker processes that compile block graphs for a :class:`~.precompile.PrecompiledBlocks`.

    :meth:`submit` hands a block to an idle worker, or starts one; :meth:`start` starts one early, which
    the engine does only when its first image will certainly compile (decision 46; workers started on
    every start slowed a warm start on a 2-core CPU by 1.6 s, two of them importing torch);
    :meth:`release_idle` lets idle workers exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._workers: list[_Worker] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.closed = False

    def submit(self, block: torch.nn.Module, digest: str, path: Path, args: tuple, kwargs: dict,
               dynamic: bool) -> Job | None:
        """Hand ``block``'s compile for this call to a worker; None when it cannot be handed over
        (the caller compiles it itself)."""
        try:
            payload = pickle.dumps((skeleton(block), _specs(args), _specs(kwargs)))
        except Exception as exc:  # a block with something the worker could not rebuild
            logger.info("compiling %s here: its structure cannot be sent to a worker (%s: %s)",
                        type(block).__name__, type(exc).__name__, exc)
            return None
        message = {"payload": base64.b64encode(payload).decode(), "digest": digest, "dynamic": dynamic,
                   "folder": str(path.parent), "grad": torch.is_grad_enabled(),
                   "inference": torch.is_inference_mode_enabled()}
        job = Job(type(block).__name__, str(path))
        if not self._send(job, message):
            return None
        logger.info("compiling %s in a worker process", job.block)
        return job

    def _send(self, job: Job, message: dict[str, Any]) -> bool:
        """Send ``job`` to an idle worker, or to one started for it; False when none took it (closed,
        or a worker that could not start: logged)."""
        with self._lock:
            if self.closed:
                return False
            idle = [w for w in self._workers if not w.busy and w.process.poll() is None]
            number = next(self._numbers)
            message["id"] = number
            try:
                worker = idle[0] if idle else _Worker(self.device)
                if not idle:
                    self._workers.append(worker)
                worker.send(number, job, message)
            except OSError as exc:
                logger.info("no worker took the compile of %s (%s); it is compiled here", job.block, exc)
                return False
        return True

    def start(self, count: int = 1) -> None:
        """Start workers now, without a job, until ``count`` are idle (decision 46): the engine calls
        this when its first image will compile, so that a worker's start (interpreter, torch, CUDA, the
        compiler's imports, inductor's pool of compile processes: a few seconds) overlaps the loading
        of the weights instead of the first image's compile (and the registry, for decision 47's two
        workers, before its checks). :meth:`submit` and :meth:`expect` hand them their first jobs."""
        with self._lock:
            idle = sum(not w.busy and w.process.poll() is None for w in self._workers)
            for _ in range(count - idle if not self.closed else 0):
                try:
                    self._workers.append(_Worker(self.device))
                except OSError as exc:
                    logger.info("could not start a compile worker ahead (%s); it starts with its first job", exc)
                    return

    def expect(self, config: dict[str, Any], vae_scale_factor: int, options: Any, dtype: torch.dtype,
               folder: Path, classes: Sequence[str]) -> list[Job]:
        """Compile the expected first request's graph of each block class in ``classes``, one worker
        per class (started now, decision 47): the worker builds its blocks from ``config`` and
        ``options`` (a resolved :class:`~.specs.EngineOptions`) and announces the file it compiles
        (:attr:`Job.announced`). Returns the jobs handed over (none when no worker could start)."""
        from .expected_compile import EXPECTED

        jobs: list[Job] = []
        for name in classes:
            message = {"kind": "expected", "config": config, "vae_scale_factor": vae_scale_factor,
                       "options": dataclasses.asdict(options), "dtype": str(dtype).removeprefix("torch."),
                       "request": dataclasses.asdict(EXPECTED), "block": name, "folder": str(folder)}
            job = Job(name, "")
            if not self._send(job, message):  # one worker per class: each takes its job once ready
                break
            jobs.append(job)
        if jobs:
            logger.info("compiling %s for a %dx%d request in worker processes while the weights are read",
                        " and ".join(j.block for j in jobs), EXPECTED.width, EXPECTED.height)
        return jobs

    def cancel(self, job: Job) -> None:
        """Stop the worker compiling ``job`` (a graph no block will ask for, decision 47): its CPU goes
        to the compiles this process needs. The job ends as failed; other workers go on."""
        with self._lock:
            for worker in [w for w in self._workers if any(j is job for j in w.jobs.values())]:
                worker.process.kill()
                self._workers.remove(worker)

    def release_idle(self) -> None:
        """Let workers without a job exit (they hold a process, and a CUDA context once used)."""
        with self._lock:
            for worker in [w for w in self._workers if not w.busy]:
                worker.close()
                self._workers.remove(worker)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            for worker in self._workers:
                worker.close()
            self._workers.clear()


# --------------------------------------------------------------------------------------------------
# The worker's side
# --------------------------------------------------------------------------------------------------

#: Imports the pack under the name the serving process uses, then runs :func:`worker_main`. Class names
#: in the pickle and in the block's fingerprint include that name, so it must be the same. A top-level
#: ``fastlora_core`` is imported from its own folder's parent (the serving process may have found it
#: through a ``sys.path`` entry the worker does not inherit); inside ComfyUI it is a sub-package of the
#: custom node's folder, whose own ``__init__`` imports ComfyUI, so the parents are registered as bare
#: packages instead.
_BOOT = """
import importlib, os, sys, types
name, folder, device = sys.argv[1], sys.argv[2], sys.argv[3]
sys.stdout.flush()
fd = os.dup(1)
os.dup2(2, 1)
parts = name.split(".")
if len(parts) == 1:
    sys.path.insert(0, os.path.dirname(folder))
for i in range(1, len(parts)):
    parent = ".".join(parts[:i])
    if parent not in sys.modules:
        module = types.ModuleType(parent)
        path = folder
        for _ in range(len(parts) - i):
            path = os.path.dirname(path)
        module.__path__ = [path]
        sys.modules[parent] = module
importlib.import_module(name + ".background_compile").worker_main(fd, device)
"""


def _compile_one(message: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from .block_keys import call_signature, fingerprint
    from .precompile import PrecompiledBlocks

    block, args, kwargs = pickle.loads(base64.b64decode(message["payload"]))
    with torch.inference_mode(message["inference"]), torch.set_grad_enabled(message["grad"]):
        block = rebuild(block, device)
        args, kwargs = _built(args, device), _built(kwargs, device)
        digest = fingerprint(block).digest
        if digest != message["digest"]:
            return {"ok": False, "error": "the rebuilt block's fingerprint differs from the original's"}
        blocks = PrecompiledBlocks(Path(message["folder"]), device)
        dynamic = bool(message["dynamic"])
        slot = (type(block), digest, call_signature(args, kwargs, sizes=not dynamic))
        fn = blocks._compile(slot, block, args, kwargs, dynamic=dynamic)
        if fn is None or blocks.stats.saved != 1:
            return {"ok": False, "error": "; ".join(blocks.stats.failures) or "not saved"}
        return {"ok": True, "path": str(blocks.path(slot))}


def _compile_expected(message: dict[str, Any], device: torch.device,
                      announce: Callable[[str, dict[str, float]], None]) -> dict[str, Any]:
    """Decision 47: build the specimen, record its block class's inputs for the expected request,
    announce the file's name (with the seconds of each step before it), then compile and save it (or
    find it saved already)."""
    from .block_keys import call_signature, fingerprint
    from .expected_compile import block_inputs, specimen, step_inputs
    from .precompile import PrecompiledBlocks, repeated_blocks
    from .specs import EngineOptions, GenerateRequest

    options = EngineOptions(**message["options"])
    dtype = getattr(torch, message["dtype"])
    request = GenerateRequest(**message["request"])
    phases = Phases(device)
    with torch.inference_mode():  # the engine samples under inference mode
        transformer = specimen(message["config"], options, dtype, device, phases)
        with phases.phase("inputs"):
            inputs = step_inputs(transformer, request, int(message["vae_scale_factor"]), dtype, device)
            seen = block_inputs(transformer, inputs)
        block = next(b for b in repeated_blocks(transformer) if type(b).__name__ == message["block"])
        args, kwargs = seen[message["block"]]
        blocks = PrecompiledBlocks(Path(message["folder"]), device)
        slot = (type(block), fingerprint(block).digest, call_signature(args, kwargs))
        path = blocks.path(slot)
        announce(str(path), phases.as_dict())
        if path.is_file():  # another process saved it meanwhile
            return {"ok": True, "path": str(path)}
        fn = blocks._compile(slot, block, args, kwargs)
    if fn is None or blocks.stats.saved != 1:
        return {"ok": False, "error": "; ".join(blocks.stats.failures) or "not saved"}
    return {"ok": True, "path": str(path)}


def _get_ready(device: torch.device) -> dict[str, float]:
    """What every job needs first, done before the first job arrives (decision 46): inductor's pool of
    compile processes (on a GPU; otherwise the first kernels of a process's first compile are compiled
    one by one while the pool starts), the compiler's imports, torchao's (a job's quantised weights are
    its tensors) and the device's context. A step that fails is left to the job, which reports it.
    Returns each step's seconds (a job's timeline shows them)."""
    from .optimize import import_compiler, warm_compile_pool

    steps: dict[str, Callable[[], object]] = {"compiler": import_compiler}
    if device.type == "cuda":
        steps = {"pool": warm_compile_pool, **steps, "cuda": lambda: torch.zeros(1, device=device)}
    if importlib.util.find_spec("torchao") is not None:
        steps["torchao"] = lambda: importlib.import_module("torchao")
    phases = Phases()
    for name, step in steps.items():
        with phases.phase(name):
            try:
                step()
            except Exception as exc:  # the job meets it again and reports it
                logger.warning("getting ready: %s: %s", type(exc).__name__, exc)
    return phases.as_dict()


def worker_main(fd: int, device_name: str) -> None:
    """Get ready, then compile the jobs read from stdin until it ends; one JSON reply per job on ``fd``."""
    boot = process_age()
    logging.basicConfig(level=logging.WARNING, format="FastLoRA compile worker: %(levelname)s %(message)s")
    from .optimize import configure_worker_compile

    configure_worker_compile()
    device = torch.device(device_name)
    steps = _get_ready(device)
    if boot is not None:
        steps = {"boot": round(boot, 3), **steps}  # the interpreter, torch and the pack imported
    ready = time.time()
    with os.fdopen(fd, "w", encoding="utf-8") as replies:
        for line in sys.stdin:
            message = json.loads(line)
            t0 = time.perf_counter()

            def announce(path: str, specimen: dict[str, float], number: int = message["id"]) -> None:
                replies.write(json.dumps({"id": number, "announce": path, "ready": ready, "steps": steps,
                                          "specimen": specimen, "at": time.time()}) + "\n")
                replies.flush()

            try:
                if message.get("kind") == "expected":
                    reply = _compile_expected(message, device, announce)
                else:
                    reply = _compile_one(message, device)
            except Exception as exc:  # reported; the serving process compiles the block itself
                reply = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            reply.update(id=message["id"], seconds=time.perf_counter() - t0, ready=ready, steps=steps, at=time.time())
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
            if device.type == "cuda":
                torch.cuda.empty_cache()
