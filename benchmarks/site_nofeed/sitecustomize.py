"""``bench_tiers`` without decision 62's master feed, for a same-call comparison: the fused strategy's
``_master_feed`` returns None (one pageable copy per layer, the code before it) in every process that has
this folder on ``PYTHONPATH``. Patched when ``fastlora_core.lora.fused`` is first imported
(``benchmarks/site_patch.py``)."""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_fastlora_site_patch", os.path.join(os.path.dirname(_HERE), "site_patch.py"))
assert _spec is not None and _spec.loader is not None
_site_patch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_site_patch)


def _no_feed(fused) -> None:  # type: ignore[no-untyped-def]
    fused.FusedStrategy._master_feed = lambda self, keys: None


_site_patch.patch_on_import("fastlora_core.lora.fused", _no_feed, _HERE)
