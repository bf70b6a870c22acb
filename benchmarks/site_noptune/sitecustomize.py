"""``bench_startup``'s ``_noptune`` variant: inductor's ``triton.autotune_pointwise`` off in every process of
the run (``benchmarks/site_patch.py``)."""

import os
import runpy

_HERE = os.path.dirname(os.path.abspath(__file__))
runpy.run_path(os.path.join(os.path.dirname(_HERE), "site_patch.py"), {"HERE": _HERE}, "__site_patch__")
