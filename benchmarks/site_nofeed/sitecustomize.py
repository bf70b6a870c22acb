"""``bench_tiers`` without decision 62's master feed, for a same-call comparison: the fused strategy's
``_master_feed`` returns None in every process of the run (``benchmarks/site_patch.py``)."""

import os
import runpy

_HERE = os.path.dirname(os.path.abspath(__file__))
runpy.run_path(os.path.join(os.path.dirname(_HERE), "site_patch.py"), {"HERE": _HERE}, "__site_patch__")
