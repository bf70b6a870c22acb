"""Dependencies that are missing, too old or built for another torch: ComfyUI still starts, the
pack's nodes are registered, the start-up log and the node's error say what to install, and the
optional features (torchao, bitsandbytes, triton) fall back or refuse clearly. Each dependency is
hidden in a fresh interpreter by an import blocker, as if it were not installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import comfy_stub  # tests/ helper (pytest puts tests/ on sys.path)
import pytest

from fastlora_core import deps
from fastlora_core.errors import DependencyError

ROOT = comfy_stub.ROOT
NODES = ["Generate", "LoraHotswap", "LoraHotswapModel", "OptimizedFluxLoader", "PadDummyLora"]

# Runs in a fresh interpreter: hide HIDDEN, import the pack as ComfyUI does (with comfy_stub), run
# ACTION and print one JSON line with what happened.
SCRIPT = """
import importlib.abc, json, logging, sys, tempfile
from pathlib import Path

HIDDEN = {hidden!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == HIDDEN:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
        return None


sys.meta_path.insert(0, Blocker())
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sys.path.insert(0, {tests!r})
import comfy_stub

models = Path(tempfile.mkdtemp())
(models / "diffusers" / "flux").mkdir(parents=True)
(models / "diffusers" / "flux" / "model_index.json").write_text("{{}}")
comfy_stub.install(models)
pack = comfy_stub.load_pack()
out = {{"nodes": sorted(pack.NODE_CLASS_MAPPINGS)}}
try:
{action}
except Exception as exc:
    out["error"] = f"{{type(exc).__name__}}: {{exc}}"
print("RESULT " + json.dumps(out))
"""

LOADER = dict(source="diffusers folder", diffusers_model="flux", transformer="None", clip_l="None", t5xxl="None",
              vae="None", quantization="none", t5_quantization="none", attention="auto", compile="off",
              offload="none", dtype="float32", swap_strategy="fused", max_rank=16)
RUN_LOADER = f"    pack.NODE_CLASS_MAPPINGS['OptimizedFluxLoader']().load(**{LOADER!r})"


def _run_hidden(hidden: str, action: str) -> tuple[dict[str, Any], str]:
    code = SCRIPT.format(hidden=hidden, tests=str(ROOT / "tests"), action=textwrap.indent(action, "    "))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


def test_missing_diffusers_is_named_at_startup_and_by_the_loader_node() -> None:
    result, log = _run_hidden("diffusers", RUN_LOADER.strip())
    assert result["nodes"] == NODES  # the nodes are still registered
    startup = [x for x in log.splitlines() if x.startswith("WARNING ComfyUI-FastLoRA:")]
    assert len(startup) == 1 and "diffusers (not installed; pip install 'diffusers>=0.35')" in startup[0]
    assert "requirements.txt" in startup[0]
    # the node's error names the same package and fix, before any model file is read
    assert result["error"].startswith("DependencyError: FastLoRA cannot run")
    assert "diffusers (not installed; pip install 'diffusers>=0.35')" in result["error"]


def test_without_torchao_the_pack_loads_auto_falls_back_and_explicit_quantization_refuses() -> None:
    action = textwrap.dedent("""
        from fastlora_core import deps, optimize, specs
        import torch
        out["reason"] = deps.usable("torchao")  # what _why_not_fp8 reports on an fp8 GPU
        out["auto"] = optimize.resolve_options(specs.EngineOptions(quantization="auto", t5_quantization="none"),
                                               torch.device("cpu")).quantization
    """) + RUN_LOADER.strip().replace("'quantization': 'none'", "'quantization': 'int8_weight_only'")
    result, log = _run_hidden("torchao", action)
    assert result["nodes"] == NODES
    assert re.search(r"INFO ComfyUI-FastLoRA: FastLoRA optional packages unavailable: torchao \(not installed; "
                     r"pip install torchao\): quantization fp8", log), log[-2000:]
    assert "WARNING ComfyUI-FastLoRA" not in log  # optional: nothing is required of the user
    assert result["reason"] == "torchao is not installed (pip install torchao)"
    assert result["auto"] == "none"
    assert result["error"].startswith("OptionsError: quantization=int8_weight_only needs torchao")


def test_without_bitsandbytes_the_pack_loads_and_explicit_t5_quantization_refuses() -> None:
    action = RUN_LOADER.strip().replace("'t5_quantization': 'none'", "'t5_quantization': 'nf4'")
    result, log = _run_hidden("bitsandbytes", action)
    assert result["nodes"] == NODES
    assert "bitsandbytes (not installed; pip install bitsandbytes): t5_quantization nf4" in log
    assert result["error"].startswith("OptionsError: t5_quantization=nf4 needs bitsandbytes")


def test_without_triton_compile_falls_back_to_off_on_a_gpu_with_a_warning() -> None:
    action = textwrap.dedent("""
        from fastlora_core import optimize, specs
        import torch
        options = specs.EngineOptions(quantization="none", t5_quantization="none", compile="regional")
        out["gpu"] = optimize.resolve_options(options, torch.device("cuda")).compile
        out["cpu"] = optimize.resolve_options(options, torch.device("cpu")).compile
    """)
    result, log = _run_hidden("triton", action)
    assert result["nodes"] == NODES
    assert "triton (not installed; pip install triton): compile on NVIDIA GPUs falls back" in log
    assert result["gpu"] == "off"
    assert re.search(r"WARNING compile=regional -> off: torch.compile on cuda needs Triton: triton is not "
                     r"installed", log), log[-2000:]
    assert result["cpu"] == "regional" or "needs a C++ compiler" in log  # the CPU compiles with C++


def test_a_package_that_does_not_import_with_this_torch_is_reported_not_raised(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "fastlora_broken_ext"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('built for torch 2.3, found 2.11')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    deps.usable.cache_clear()
    try:
        why = deps.usable("fastlora_broken_ext")
    finally:
        deps.usable.cache_clear()
    assert why == ("fastlora_broken_ext is installed but does not import with this torch "
                   "(RuntimeError: built for torch 2.3, found 2.11)")


def test_a_triton_that_does_not_match_torch_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deps.sys, "platform", "linux")
    versions = {"triton": "3.1.0", "torch": "2.11.0+cu130"}
    monkeypatch.setattr(deps, "installed_version", versions.get)
    monkeypatch.setattr(deps.importlib.metadata, "requires",
                        lambda dist: ['triton==3.6.0; platform_system == "Linux"'] if dist == "torch" else [])
    monkeypatch.setattr(deps, "_found", lambda name: True)
    (problem,) = deps.problems()
    assert problem.describe() == ("triton (3.1.0 installed, torch 2.11.0+cu130 needs triton==3.6.0; pip install "
                                  "'triton==3.6.0'): compile on NVIDIA GPUs falls back to compile=off")
    versions["triton"] = "3.6.0"
    assert deps.problems() == []
    monkeypatch.setattr(deps.sys, "platform", "win32")
    monkeypatch.setattr(deps, "_found", lambda name: name != "triton")
    (problem,) = deps.problems()
    assert problem.fix == "pip install triton-windows"


def test_a_too_old_required_package_is_named_with_the_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deps, "installed_version", lambda dist: "0.15.2" if dist == "peft" else "99")
    message = deps.missing_required_message()
    assert "peft (0.15.2 installed, needs >= 0.17; pip install -U 'peft>=0.17')" in message
    from fastlora_core.errors import DependencyError

    with pytest.raises(DependencyError, match="peft"):
        deps.require()


def test_requirements_and_pyproject_match_the_dependency_table() -> None:
    def parse(lines: list[str]) -> dict[str, str]:
        out = {}
        for line in lines:
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)", line)
            if m:
                out[m.group(1).lower()] = m.group(2)
        return out

    requirements = parse((ROOT / "requirements.txt").read_text().splitlines())
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; we support 3.10)
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block is not None
    pyproject = parse([line.strip().strip('",') for line in block.group(1).splitlines()])
    assert len(pyproject) >= len(deps.REQUIRED)
    table = {dist: minimum for dist, minimum in deps.REQUIRED.values()}
    assert "torch" not in requirements and "torch" not in pyproject  # ComfyUI owns torch
    for listed in (requirements, pyproject):
        assert {d: v for d, v in listed.items() if d in table} == table
        assert set(listed) - set(table) <= {dist for dist, _ in deps.OPTIONAL.values()}


# -- decision 43: an optional package an earlier process imported is vouched for from a record ----------


def _fake_package(root: Path, name: str, body: str = "VALUE = 1\n") -> Path:
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    init = package / "__init__.py"
    init.write_text(body)
    return init


@pytest.fixture
def records_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache home of its own, a fresh ``usable`` cache, and a folder on sys.path for fake packages."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(deps, "_deferred", [])  # this test's fake packages stay its own
    deps.usable.cache_clear()
    yield tmp_path
    deps.usable.cache_clear()


def _forget_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """As in a new process: the module not imported, usable() not asked yet."""
    monkeypatch.delitem(sys.modules, name, raising=False)
    deps.usable.cache_clear()


def test_an_import_that_worked_is_trusted_by_the_next_process_until_the_install_changes(
        records_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "fastlora_fake_optional_a"
    init = _fake_package(records_home / "site", name)
    assert deps.usable(name) == "" and name in sys.modules  # first process: imported, then recorded
    assert name in json.loads((records_home / "cache" / "imports.json").read_text())

    _forget_module(monkeypatch, name)
    assert deps.usable(name) == "" and name not in sys.modules  # vouched for, not imported
    assert deps.deferred() == [name]
    deps.import_deferred()
    assert name in sys.modules and deps.deferred() == []

    _forget_module(monkeypatch, name)
    init.write_text("VALUE = 2  # an upgrade\n")
    assert deps.usable(name) == "" and name in sys.modules  # another install: imported again
    _forget_module(monkeypatch, name)
    monkeypatch.setattr(deps, "TRUST_RECORDS", False)
    assert deps.usable(name) == "" and name in sys.modules  # the switch: always import


def test_a_trusted_package_that_no_longer_imports_is_refused_at_first_use_with_what_to_do(
        records_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same files and versions as the record, yet the import fails now (a CUDA library removed
    under it): the first use says what to do, and the next start imports before trusting."""
    import os

    name = "fastlora_fake_optional_b"
    init = _fake_package(records_home / "site", name, "VALUE = 1" + " " * 40 + "\n")
    assert deps.usable(name) == ""
    stat = init.stat()
    _forget_module(monkeypatch, name)
    init.write_text("raise OSError('libcudart.so.13: cannot open')\n"[:stat.st_size].ljust(stat.st_size - 1) + "\n")
    os.utime(init, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.rmtree(init.parent / "__pycache__", ignore_errors=True)  # same mtime and size: a cached .pyc would win
    assert deps.usable(name) == ""  # the stamp still matches: vouched for
    with pytest.raises(DependencyError, match=rf"{name} imported in an earlier run but does not import now "
                                              r"\(OSError: libcudart.so.13: cannot open\)\. Start again"):
        deps.confirm(name)
    _forget_module(monkeypatch, name)
    assert deps.usable(name).startswith(f"{name} is installed but does not import with this torch (OSError")


def test_the_checks_before_the_reads_import_neither_torchao_nor_dynamo_when_vouched_for(tmp_path: Path) -> None:
    """Decision 43: with a record from an earlier process, the dependency and device checks and the
    compile cache's set-up leave torchao (and the Dynamo it imports, about a second) to the wait for
    the weights; the engine then quantises with it as before."""
    code = textwrap.dedent(f"""
        import json, sys
        import torch
        from fastlora_core import deps, optimize, registry
        from fastlora_core.specs import EngineOptions, GenerateRequest, ModelSource
        from fastlora_core.tiny import write_tiny_model
        options = EngineOptions(quantization="int8_weight_only", compile="regional", dtype="float32")
        deps.require()
        optimize.resolve(options)
        optimize.configure_compile_cache(options)
        out = {{"before_reads": sorted(m for m in ("torchao", "torch._dynamo", "torch._inductor") if m in sys.modules),
               "deferred": deps.deferred()}}
        engine = registry.get_engine(ModelSource.from_diffusers(str(write_tiny_model({str(tmp_path / "model")!r}))),
                                     options)
        out["quantised"] = type(engine.transformer.transformer_blocks[0].attn.to_q.weight).__name__
        print("RESULT " + json.dumps(out))
    """)
    env = dict(__import__("os").environ, FASTLORA_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    runs = []
    for _ in range(2):  # the first process imports and records, the second trusts the record
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=str(ROOT), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    assert "torchao" in runs[0]["before_reads"] and runs[0]["deferred"] == []
    assert runs[1]["before_reads"] == [] and runs[1]["deferred"] == ["torchao"]
    assert runs[0]["quantised"] == runs[1]["quantised"] != "Parameter"
