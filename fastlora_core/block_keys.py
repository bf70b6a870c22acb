"""What a saved block graph's file name and its per-call checks are made of (ARCHITECTURE decision 40).

A graph saved by :mod:`.precompile` can only be loaded where it would trace the same: same software,
same device, same block (module tree, classes' source, parameters' layout, the functions its modules
hold) and same call (inputs as Dynamo sees them, grad mode). This module turns each of those into a
process-independent description: :func:`software`, :func:`device_id`, :func:`source`,
:func:`fingerprint` (with the identity checks that keep it valid between calls) and
:func:`call_signature`. Anything that would trace differently describes differently.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import sys
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Bumped when what a saved file holds, or how its key is made, changes (2: compiled without inductor's
#: run-time reduction rescaling, decision 57).
FORMAT = 2

#: ``TORCHINDUCTOR_*`` variables that change where inductor works, not the code it generates.
_INDUCTOR_ENV_NOT_CODE = frozenset({"TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS"})

#: Plain attributes that a class's instances hold but no forward reads, by the class (module, name)
#: that sets them. They are left out of the fingerprint because they differ from layer to layer and
#: would give every block a graph of its own: PEFT's LoRA layers keep the keyword arguments they were
#: built with, their own module name (``target_name``) among them. With them hashed, a
#: ``swap_strategy=adapter`` slot compiled and saved one graph per block, 57 instead of 2 (H100,
#: 2026-12-07: 66 s of compile in the 24 GB tier's first image).
NOT_TRACED: dict[tuple[str, str], frozenset[str]] = {
    ("peft.tuners.tuners_utils", "BaseTunerLayer"): frozenset({"kwargs"}),
}


@functools.cache
def software() -> tuple[str, ...]:
    """Versions and settings that change what inductor generates, read once per process.

    Inductor reads its ``TORCHINDUCTOR_*`` environment variables once, as its settings' defaults
    (``TORCHINDUCTOR_ENABLE_PDL``, ``TORCHINDUCTOR_MAX_AUTOTUNE``...). A saved block is loaded without
    inductor's own cache key, so those variables are part of this one: a process started with other
    settings compiles its own graphs instead of loading code generated under the old ones."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    settings = sorted(f"{k}={v}" for k, v in os.environ.items()
                      if k.startswith("TORCHINDUCTOR_") and k not in _INDUCTOR_ENV_NOT_CODE)
    return (f"format {FORMAT}", f"torch {torch.__version__}", f"triton {version('triton')}",
            f"torchao {version('torchao')}", f"peft {version('peft')}", f"python {sys.version.split()[0]}",
            *settings)


@functools.cache
def device_id(device: torch.device) -> str:
    """What the compiled code was built for: the GPU model and compute capability, or the CPU's
    architecture and vector instructions (a cache folder shared between machines must not hand
    AVX-512 code to a CPU without it)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    if device.type == "cpu":
        return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return device.type


@functools.cache
def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def source(obj: type | types.FunctionType) -> str:
    """A class or function by name, with a digest of the file that defines it (its code and
    everything it calls there)."""
    path = getattr(sys.modules.get(obj.__module__), "__file__", None)
    return f"{obj.__module__}.{obj.__qualname__}@{_file_digest(path) if path else '-'}"


def _tensor_meta(t: torch.Tensor) -> tuple:
    """What Dynamo would guard on for a tensor, plus a quantised tensor's layout (its inner tensors
    and flatten context)."""
    meta: tuple = (type(t).__qualname__, tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, ctx = flatten()
        inner = tuple((n, _tensor_meta(getattr(t, n))) for n in names)
        return (*meta, inner, repr(ctx))
    return (*meta, tuple(t.stride()))


def _value_id(value: object) -> str:
    """A process-independent description of an attribute value a module holds (not a tensor or a
    module): constants by value, functions by name, closure and defaults."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(_value_id(v) for v in value)})"
    if isinstance(value, functools.partial):
        return f"partial({_value_id(value.func)}, {_value_id(value.args)}, {sorted(value.keywords)})"
    if isinstance(value, types.MethodType):
        return f"method {_value_id(value.__func__)} of {type(value.__self__).__qualname__}"
    if isinstance(value, types.FunctionType):
        cells = tuple(c.cell_contents for c in value.__closure__ or ())
        return f"fn {source(value)} closure {_value_id(cells)} defaults {_value_id(value.__defaults__)}"
    text = f"{type(value).__module__}.{type(value).__qualname__} {value!r}"
    if " at 0x" in text and type(value) not in _ADDRESS_WARNED:
        # A repr with a memory address differs in every process (and for every object): the blocks
        # holding it get graphs that no later process loads, nor another block shares. Say so once.
        _ADDRESS_WARNED.add(type(value))
        logger.warning("a block's attribute or call input is a %s.%s whose description carries its memory "
                       "address, so its compiled graph is keyed per object and process (a compile per block, "
                       "none loaded after a restart); list the attribute in block_keys.NOT_TRACED if no "
                       "forward reads it",
                       type(value).__module__, type(value).__qualname__)
    return text


_ADDRESS_WARNED: set[type] = set()


_MISSING = object()


def _same(current: object, recorded: object) -> bool:
    """Whether an attribute still holds what was fingerprinted: tensors and functions by identity
    (held weakly, so a fingerprint never keeps freed weights alive), constants by value."""
    if isinstance(recorded, weakref.ref):
        return current is recorded()
    try:
        return type(current) is type(recorded) and bool(current == recorded)
    except Exception:  # an attribute whose == is not a plain answer: fingerprint again to be safe
        return False


def _record(value: object) -> object:
    if isinstance(value, (dict, list, set)):
        return type(value)(value)  # a copy: the container may be changed in place
    try:
        return weakref.ref(value) if not isinstance(value, (bool, int, float, str, tuple, type(None))) else value
    except TypeError:  # not weak-referenceable (a torch.dtype, a slice): compared by value
        return value


@dataclass
class Fingerprint:
    """A block's trace-relevant state: a digest, and what keeps it valid: each attribute, parameter
    and submodule the block's modules hold (as recorded by :func:`_record`), how many of each (an
    added attribute shadows a class default), and each module's class."""

    digest: str
    watched: list[tuple[dict, str, object]] = field(default_factory=list)
    sizes: list[tuple[dict, int]] = field(default_factory=list)
    classes: list[tuple[weakref.ref, type]] = field(default_factory=list)

    def still_valid(self) -> bool:
        return (all(len(holder) == n for holder, n in self.sizes)
                and all(_same(holder.get(name, _MISSING), recorded) for holder, name, recorded in self.watched)
                and all(type(ref()) is cls for ref, cls in self.classes))


def fingerprint(block: torch.nn.Module) -> Fingerprint:
    """Hash what the block's trace depends on besides the call's inputs: its module tree (classes and
    their source files), parameters and buffers (meta, not values) and the plain attributes its
    modules hold (constants, functions such as the attention kernel).

    The parameters are read past their ``__torch_function__`` (decision 54): the values are the
    tensors' own either way, but torchao's handler runs Python for each attribute of each fp8 weight,
    0.25 of the 0.30 s that a first image's first step spent here (py-spy, H100, 2026-12-06)."""
    with torch._C.DisableTorchFunctionSubclass():
        return _fingerprint(block)


_NOT_TRACED_BY_CLASS: dict[type, frozenset[str]] = {}


def _not_traced(cls: type) -> frozenset[str]:
    """The :data:`NOT_TRACED` attributes of ``cls`` (those set by any class it derives from), looked up
    once per class."""
    found = _NOT_TRACED_BY_CLASS.get(cls)
    if found is None:
        found = _NOT_TRACED_BY_CLASS[cls] = frozenset().union(
            *(NOT_TRACED.get((c.__module__, c.__qualname__), frozenset()) for c in cls.__mro__))
    return found


def _fingerprint(block: torch.nn.Module) -> Fingerprint:
    parts: list[str] = []
    watched: list[tuple[dict, str, object]] = []
    sizes: list[tuple[dict, int]] = []
    classes: list[tuple[torch.nn.Module, type]] = []
    for name, module in block.named_modules():
        parts.append(f"module {name} {source(type(module))}")
        classes.append((module, type(module)))
        for holder in (module.__dict__, module._parameters, module._buffers, module._modules):
            sizes.append((holder, len(holder)))
        for key, child in module._modules.items():
            watched.append((module._modules, key, _record(child)))
        for holder_name in ("_parameters", "_buffers"):
            holder = module.__dict__[holder_name]
            for key, tensor in holder.items():
                watched.append((holder, key, _record(tensor)))
                parts.append(f"{holder_name} {name}.{key} "
                             f"{_tensor_meta(tensor) if tensor is not None else None}")
        attrs = module.__dict__
        skip = _not_traced(type(module))
        for key in sorted(attrs):
            value = attrs[key]
            if key.startswith("_") or key in skip or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            watched.append((attrs, key, _record(value)))
            parts.append(f"attr {name}.{key} {_value_id(value)}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return Fingerprint(digest, watched, sizes, [(weakref.ref(m), cls) for m, cls in classes])


def _input_meta(value: object, sizes: bool) -> object:
    """One input as Dynamo sees it; tensors by :func:`_tensor_meta`, or by rank only without ``sizes``."""
    if isinstance(value, torch.Tensor):
        if sizes:
            return _tensor_meta(value)
        return (type(value).__qualname__, value.dim(), value.dtype, value.device.type, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_input_meta(v, sizes) for v in value))
    if isinstance(value, dict):
        return tuple((k, _input_meta(v, sizes)) for k, v in sorted(value.items()))
    return _value_id(value)


#: The last part of a dynamic-shape slot: it names how such graphs are traced, so that files traced
#: another way are not loaded (with duck shaping they could hold a size; decision 58).
DYNAMIC_SLOT = "dynamic, a symbol per dimension"


def call_signature(args: tuple, kwargs: dict, sizes: bool = True) -> tuple:
    """The call's inputs as Dynamo sees them (tensor meta, constants) and the autograd mode; with
    ``sizes=False`` tensors count by rank only (the slot of a graph compiled with dynamic shapes)."""
    return (_input_meta(args, sizes), _input_meta(kwargs, sizes), torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), "sizes" if sizes else DYNAMIC_SLOT)


def in_inference_mode(signature: tuple) -> bool:
    """The inference-mode flag of a :func:`call_signature`."""
    return bool(signature[-2])
