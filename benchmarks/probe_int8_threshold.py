"""bitsandbytes int8 with one outlier activation column, LLM.int8() thresholds 0 and 6 (decision 61; CUDA).

    python -m benchmarks.probe_int8_threshold

bitsandbytes quantises activations on the GPU only, so this is where ``t5_quantization=int8``'s
threshold shows: a 256x256 bf16 layer, 64 rows of input with column 7 scaled 60x, and the relative
error of the int8 layer's output against the bf16 layer's for bitsandbytes' default threshold (0:
every column in int8) and transformers' (6.0: the outlier column in 16-bit). Prints JSON.
"""

from __future__ import annotations

import json

import torch
from torch import nn


def main() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(256, 256).to(torch.bfloat16).cuda()
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    x[:, 7] *= 60.0
    with torch.no_grad():
        ref = lin(x).float()
    errors = {}
    for threshold in (0.0, 6.0):
        q = bnb.nn.Linear8bitLt(256, 256, bias=True, has_fp16_weights=False, threshold=threshold)
        q.weight = bnb.nn.Int8Params(lin.weight.data.cpu().clone(), requires_grad=False, has_fp16_weights=False)
        q.bias = nn.Parameter(lin.bias.data.cpu().clone(), requires_grad=False)
        q = q.cuda()
        with torch.no_grad():
            errors[str(threshold)] = float((q(x).float() - ref).norm() / ref.norm())
    print(json.dumps({"device": torch.cuda.get_device_name(), "bitsandbytes": bnb.__version__,
                      "relative_error_by_threshold": errors}))


if __name__ == "__main__":
    main()
