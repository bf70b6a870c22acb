"""What the benchmarks' ``site_*/sitecustomize.py`` variants share: a change applied to one module the
moment it is first imported, in every process that has the variant's folder on ``PYTHONPATH`` (the
serving process and the compile workers it starts alike), so that nothing is imported earlier than
without it; then any other ``sitecustomize`` on the path still runs. Loaded by file path (the
``benchmarks`` folder is not a package on ``sys.path`` at interpreter start)."""

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
