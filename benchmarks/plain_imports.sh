#!/bin/bash
# Plain import costs in fresh processes (issue 13, decision 39): each set imported three times with
# byte code kept (PYTHONPYCACHEPREFIX), so runs 2-3 are what an installed package costs. Run from the
# repository root on the device: bash benchmarks/plain_imports.sh > imports.txt
export PYTHONPYCACHEPREFIX=/tmp/pyc; unset PYTHONDONTWRITEBYTECODE
sets=(
"import torch"
"import torch, torch._dynamo, torchao, safetensors, tokenizers"
"import torch, torch._dynamo, torchao, safetensors, tokenizers; from torchao.quantization import Float8DynamicActivationFloat8WeightConfig"
"import torch, torch._dynamo, torchao, safetensors, tokenizers; import transformers.models.t5.tokenization_t5, transformers.models.clip.tokenization_clip; from transformers import T5TokenizerFast, CLIPTokenizer"
"import torch, torch._dynamo, torchao, safetensors, tokenizers; import transformers.models.t5.modeling_t5, transformers.models.clip.modeling_clip"
"import torch, torch._dynamo, torchao, safetensors, tokenizers; import diffusers.models.transformers.transformer_flux"
"import torch, torch._dynamo, torchao, safetensors, tokenizers; import diffusers.pipelines.flux.pipeline_flux"
)
for s in "${sets[@]}"; do
  for i in 1 2 3; do
    t0=$(date +%s%N); python3 -W ignore -c "$s" >/dev/null 2>&1; t1=$(date +%s%N)
    echo "run$i $(( (t1 - t0) / 1000000 )) ms  $s"
  done
done
python3 -c "import sklearn, scipy; print('sklearn', sklearn.__version__, 'scipy', scipy.__version__)"
pip list 2>/dev/null | wc -l
