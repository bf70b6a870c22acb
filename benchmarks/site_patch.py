"""The benchmarks' ``site_*`` variants: a change applied to one module the moment it is first
imported, in every process that has the variant's folder on ``PYTHONPATH`` (the serving process and
the compile workers it starts alike), so that nothing is imported earlier than without it; then any
other ``sitecustomize`` on the path still runs. Each folder's ``sitecustomize.py`` runs this file by
path (the ``benchmarks`` folder is not a package on ``sys.path`` at interpreter start) with ``HERE``,
its own folder, which names the variant in :data:`VARIANTS`."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, patch: Callable[[ModuleType], None]) -> None:
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def patch_on_import(target: str, patch: Callable[[ModuleType], None], here: str) -> None:
    """Call ``patch(module)`` right after ``target`` is first executed; then run the next
    ``sitecustomize`` on ``sys.path`` after ``here`` (the variant's own folder)."""
    sys.meta_path.insert(0, _PatchOnImport(target, patch))
    other = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != here])
    if other is not None and other.loader is not None:
        other.loader.exec_module(importlib.util.module_from_spec(other))


def _no_pointwise_tuning(config: ModuleType) -> None:
    config.triton.autotune_pointwise = False  # type: ignore[attr-defined]


def _no_master_feed(fused: ModuleType) -> None:
    fused.FusedStrategy._master_feed = lambda self, keys: None  # type: ignore[attr-defined]


#: folder -> (module, change)
VARIANTS: dict[str, tuple[str, Callable[[ModuleType], None]]] = {
    # bench_startup's ``_noptune``: one launch configuration per pointwise kernel instead of two
    # compiled and timed at the first call
    "site_noptune": ("torch._inductor.config", _no_pointwise_tuning),
    # bench_tiers without decision 62's master feed (one pageable copy per layer), for a same-call comparison
    "site_nofeed": ("fastlora_core.lora.fused", _no_master_feed),
}

if __name__ == "__site_patch__":
    _here = globals()["HERE"]
    patch_on_import(*VARIANTS[os.path.basename(_here)], _here)
