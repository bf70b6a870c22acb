"""Which of FastLoRA's dependencies are usable here, and what to install when one is not.

One table (``REQUIRED`` / ``OPTIONAL``) feeds the start-up log line of the ComfyUI pack, the error a
node or the CLI raises before building an engine, and the fallbacks of the optional features.
Checks are cheap (package metadata, no import) except ``usable``, which really imports an optional
package once, at the moment a feature needs it: an installed build that does not match the
installed torch (a common state of torchao, bitsandbytes and triton) fails there, not at start-up.
Stdlib only at import time, so the pack can report a missing torch too.

An import that succeeded is recorded (``<cache home>/imports.json``: the package's version and file,
torch's version, Python's). A later process with the same install trusts the record: ``usable``
answers without importing, and the import waits for :func:`import_deferred` (the engine runs it
while its loader waits for a read, decision 43) or for :func:`confirm` at first use. torchao's
import brings in Dynamo (about a second), which stood before the weights' reads started.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic_write import write_whole
from .errors import DependencyError

logger = logging.getLogger(__name__)

# import name -> (pip distribution, minimum version). Same versions as requirements.txt and
# pyproject.toml (tests/test_deps.py keeps the three in step). torch is never installed by us.
REQUIRED: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "0.35"),
    "peft": ("peft", "0.17"),
    "transformers": ("transformers", "4.48"),
    "safetensors": ("safetensors", "0.4"),
    "sentencepiece": ("sentencepiece", "0.2"),
    "google.protobuf": ("protobuf", "4"),
    "accelerate": ("accelerate", "1.0"),
}

# import name -> (pip distribution, what is unavailable without it and what happens instead).
OPTIONAL: dict[str, tuple[str, str]] = {
    "torchao": ("torchao", "quantization fp8 / fp8_weight_only / int8_weight_only are unavailable "
                           "(quantization=auto uses none)"),
    "bitsandbytes": ("bitsandbytes", "t5_quantization nf4 / int8 are unavailable (t5_quantization=auto "
                                     "uses none)"),
    "triton": ("triton", "compile on NVIDIA GPUs falls back to compile=off"),
}

INSTALL_HINT = ("install the pack's requirements into ComfyUI's Python: `python -m pip install -r "
                "requirements.txt` in the pack's folder (torch is not in it: ComfyUI's torch stays), then "
                "restart ComfyUI")


@dataclass(frozen=True)
class Problem:
    """One dependency that is missing, too old, or does not match torch."""

    name: str  # import name
    dist: str  # pip distribution
    required: bool
    why: str  # "not installed", "0.15.0 installed, needs >= 0.17", ...
    fix: str  # what to run
    effect: str = ""  # optional ones: what is unavailable meanwhile

    def describe(self) -> str:
        text = f"{self.dist} ({self.why}; {self.fix})"
        return f"{text}: {self.effect}" if self.effect else text


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '2.11.0+cu130' -> (2, 11, 0)."""
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.group() != piece:
            break
    return tuple(parts)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] = None
        return False


def triton_torch_mismatch() -> str:
    """'' or why the installed triton is not the one the installed torch was built against (torch's
    wheel metadata pins it, e.g. ``triton==3.6.0; platform_system == "Linux"``)."""
    have = installed_version("triton")
    if not sys.platform.startswith("linux"):  # torch pins triton for Linux wheels only
        return ""
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    for req in requires:
        m = re.match(r"\s*triton\s*==\s*([\w.+]+)", req)
        if m and have and _version_tuple(have)[:2] != _version_tuple(m.group(1))[:2]:
            return f"{have} installed, torch {installed_version('torch')} needs triton=={m.group(1)}"
    return ""


def _pip_name(dist: str) -> str:
    """What to pip-install for ``dist`` on this OS (Triton has no Windows wheels; the community
    ``triton-windows`` build provides the same ``triton`` module there)."""
    return "triton-windows" if dist == "triton" and sys.platform == "win32" else dist


def problems() -> list[Problem]:
    """Every required or optional dependency that is missing or mismatched (cheap: no imports)."""
    found: list[Problem] = []
    if not _found("torch"):
        found.append(Problem("torch", "torch", True, "not installed",
                             "FastLoRA runs inside ComfyUI's Python, which has torch: start it from there"))
    for name, (dist, minimum) in REQUIRED.items():
        if not _found(name):
            found.append(Problem(name, dist, True, "not installed", f"pip install '{dist}>={minimum}'"))
            continue
        have = installed_version(dist)
        if have is not None and _version_tuple(have) < _version_tuple(minimum):
            found.append(Problem(name, dist, True, f"{have} installed, needs >= {minimum}",
                                 f"pip install -U '{dist}>={minimum}'"))
    for name, (dist, effect) in OPTIONAL.items():
        if not _found(name):
            found.append(Problem(name, dist, False, "not installed", f"pip install {_pip_name(dist)}", effect))
        elif name == "triton" and (why := triton_torch_mismatch()):
            pin = why.rsplit("needs ", 1)[1]
            found.append(Problem(name, dist, False, why, f"pip install '{pin}'", effect))
    return found


def missing_required_message(found: list[Problem] | None = None) -> str:
    """'' when every required dependency is usable; else one message naming each and what to do."""
    missing = [p for p in (problems() if found is None else found) if p.required]
    if not missing:
        return ""
    return (f"FastLoRA cannot run: missing or too old: {', '.join(p.describe() for p in missing)}. "
            f"To fix, {INSTALL_HINT}.")


def startup_lines(found: list[Problem] | None = None) -> list[tuple[int, str]]:
    """``(logging level, message)`` pairs for the ComfyUI start-up log: a warning naming every missing
    required dependency, an info line naming unavailable optional ones and their effect."""
    import logging

    found = problems() if found is None else found
    lines: list[tuple[int, str]] = []
    if message := missing_required_message(found):
        lines.append((logging.WARNING, f"{message} The nodes are registered and say the same when run."))
    optional = [p for p in found if not p.required]
    if optional:
        lines.append((logging.INFO, "FastLoRA optional packages unavailable: "
                      + "; ".join(p.describe() for p in optional) + "."))
    return lines


def require() -> None:
    """Raise ``DependencyError`` (before any model is read) when a required dependency is missing."""
    message = missing_required_message()
    if message:
        raise DependencyError(message)


def cache_home() -> Path:
    """FastLoRA's per-user cache folder: ``$FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora``,
    else ``~/.cache/fastlora`` (the compile cache is its ``inductor`` folder)."""
    base = os.environ.get("FASTLORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastlora")
    return Path(base)


#: Whether :func:`usable` may trust an earlier process's record instead of importing (the start-up
#: benchmark turns it off for a same-call comparison).
TRUST_RECORDS = True
_RECORDS = "imports.json"
_deferred: list[str] = []  # trusted, not imported yet (in the order usable() met them)


def _stamp(name: str) -> str | None:
    """What a successful import of ``name`` depended on, as one string (None: nothing to go by)."""
    try:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        st = os.stat(origin) if origin else None
    except (ImportError, ValueError, OSError):
        return None
    if st is None:
        return None
    dist = OPTIONAL.get(name, (name, ""))[0]
    return repr((installed_version(dist), installed_version("torch"), sys.version, origin, st.st_mtime_ns, st.st_size))


def _records() -> dict[str, str]:
    try:
        data = json.loads((cache_home() / _RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(name: str, stamp: str | None) -> None:
    """Record (``stamp``) or forget (None) a successful import; a cache that cannot be written is
    left as it is (the next process imports again)."""
    records = _records()
    if records.get(name) == stamp:
        return
    if stamp is None:
        records.pop(name, None)
    else:
        records[name] = stamp
    path = cache_home() / _RECORDS
    try:
        write_whole(path, lambda part: Path(part).write_text(json.dumps(records, indent=1)))
    except OSError as exc:
        logger.debug("could not write %s (%s)", path, exc)


@functools.cache
def usable(name: str) -> str:
    """'' when optional package ``name`` imports here; else why not (the import's error). Imported
    once per process, at first use: a build that does not match torch often fails only here. When
    an earlier process imported this very install, the import is left to :func:`import_deferred` or
    :func:`confirm`."""
    if not _found(name):
        dist = OPTIONAL.get(name, (name, ""))[0]
        return f"{dist} is not installed (pip install {_pip_name(dist)})"
    if name in sys.modules:
        return ""
    stamp = _stamp(name)
    if TRUST_RECORDS and stamp is not None and _records().get(name) == stamp:
        _deferred.append(name)
        return ""
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, OSError (CUDA libs), RuntimeError (torch mismatch) ...
        return f"{name} is installed but does not import with this torch ({type(exc).__name__}: {exc})"
    _write_record(name, stamp)
    return ""


def deferred() -> list[str]:
    """Packages :func:`usable` vouched for from a record and nobody has imported yet."""
    return [name for name in _deferred if name not in sys.modules]


def import_deferred() -> None:
    """Import the packages :func:`usable` vouched for from a record (work for a wait: decision 43).
    A failure is left to :func:`confirm` at the package's first use."""
    for name in deferred():
        importlib.import_module(name)


def confirm(name: str) -> None:
    """Import ``name`` before its first use (at once when already imported). An install that
    imported in an earlier process but not now (its record trusted by :func:`usable`) raises
    ``DependencyError`` saying what to do, and its record is forgotten."""
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except Exception as exc:
        _write_record(name, None)
        dist = OPTIONAL.get(name, (name, ""))[0]
        raise DependencyError(
            f"{dist} imported in an earlier run but does not import now ({type(exc).__name__}: {exc}). Start "
            f"again (FastLoRA then checks it before loading and falls back where it can), or reinstall "
            f"{_pip_name(dist)} for this torch") from exc
