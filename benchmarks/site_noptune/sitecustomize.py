"""``bench_startup``'s ``_noptune`` variant: inductor's ``triton.autotune_pointwise`` off in every process of
the run (the serving process and its compile workers inherit ``PYTHONPATH``), one launch configuration per
pointwise kernel instead of two compiled and timed at the first call. The flag is set when inductor's
config is first imported (``benchmarks/site_patch.py``)."""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_fastlora_site_patch", os.path.join(os.path.dirname(_HERE), "site_patch.py"))
assert _spec is not None and _spec.loader is not None
_site_patch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_site_patch)


def _no_pointwise_tuning(config) -> None:  # type: ignore[no-untyped-def]
    config.triton.autotune_pointwise = False


_site_patch.patch_on_import("torch._inductor.config", _no_pointwise_tuning, _HERE)
