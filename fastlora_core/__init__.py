"""FastLoRA core: load Flux.1 once, optimise and compile it, swap LoRA stacks in place.

Entry points: ``fastlora_core.registry.get_engine(source, options)`` (see ``engine.FluxEngine``),
``python -m fastlora_core {demo,generate,write-tiny}`` and the stdlib-only headless ComfyUI client
``python -m fastlora_core.headless``. Nothing heavy is imported here, so the headless client runs
without torch.
"""

__version__ = "0.1.0"
