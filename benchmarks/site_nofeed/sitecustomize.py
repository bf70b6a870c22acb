"""``bench_tiers`` without decision 62's master feed, for a same-call comparison: the fused strategy's
``_master_feed`` returns None (one pageable copy per layer, the code before it) in every process that has
this folder on ``PYTHONPATH``. Patched when ``fastlora_core.lora.fused`` is first imported, so nothing is
imported earlier than without it. Any other ``sitecustomize`` on the path still runs."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TARGET = "fastlora_core.lora.fused"


class _NoFeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            run(module)
            module.FusedStrategy._master_feed = lambda self, keys: None

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _NoFeed())

_other = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _HERE])
if _other is not None and _other.loader is not None:
    _module = importlib.util.module_from_spec(_other)
    _other.loader.exec_module(_module)
