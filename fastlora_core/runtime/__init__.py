"""FastLoRA's own Flux.1 runtime modules: the transformer, the T5 and CLIP text encoders, the VAE,
the tokenizers and the sampling loop, built on torch alone.

Why (issue 13, start-up): importing diffusers' Flux classes and transformers' encoders costs a new
process ~5-9 s of Python on the H200's host before any weight is used (diffusers' model package
imports every model it ships, its hooks import peft, transformers' modeling code imports its
generation and quantiser integrations). These modules import nothing beyond torch, so a process that
loads Flux through them pays none of it.

Rules every module here keeps:
- the same parameter names, shapes and config keys as the diffusers / transformers class it stands
  for, so checkpoints, LoRA key maps and the loader's plans apply unchanged;
- the same arithmetic in the same order, so float32 outputs are bitwise equal to the reference class
  on the CPU (``tests/test_runtime_*.py`` compare them; diffusers and transformers stay the reference
  implementation and the path for options these modules do not cover);
- no import of diffusers, transformers or peft at module level.
"""
