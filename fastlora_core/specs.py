"""Immutable, hashable specifications: what to load, how to optimise it, which LoRAs to apply.

Specs are plain frozen dataclasses so they can key the engine registry and travel between
ComfyUI nodes by value. An ``EngineOptions`` checks every combination when it is made, before any
weight is read; device-dependent checks (does this GPU do fp8?) and the ``auto`` choices happen
once, in ``optimize.resolve``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from .errors import OptionsError

Quantization = Literal["auto", "none", "fp8", "fp8_weight_only", "int8_weight_only"]
T5Quantization = Literal["auto", "none", "nf4", "int8"]
Attention = Literal["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flash_attn",
                    "cudnn_fp8"]
CompileMode = Literal["off", "full", "regional"]
Offload = Literal["none", "model", "sequential"]
DType = Literal["bfloat16", "float16", "float32"]
SwapStrategy = Literal["fused", "adapter"]

# The choices, derived from the types above (one list per option: the CLI, the nodes' combos and
# validation all read these).
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
T5_QUANTIZATIONS: tuple[str, ...] = get_args(T5Quantization)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
OFFLOADS: tuple[str, ...] = get_args(Offload)
DTYPES: tuple[str, ...] = get_args(DType)  # names; optimize.TORCH_DTYPES maps them to torch dtypes
SWAP_STRATEGIES: tuple[str, ...] = get_args(SwapStrategy)


@dataclass(frozen=True)
class ModelSource:
    """Where the Flux weights come from.

    Either ``diffusers_dir`` (a folder with ``model_index.json``) or the single files ComfyUI users
    have: ``transformer`` (BFL or diffusers key layout), ``clip_l``, ``t5xxl``, ``vae`` and
    optionally ``tokenizer_dir`` (folder holding ``clip/`` and ``t5/`` tokenizer files; inside
    ComfyUI its bundled tokenizers are used when this is empty).

    ``transformer_only``: load the transformer alone (from the diffusers folder's ``transformer/``
    or the ``transformer`` file) and no text encoder or VAE. Such an engine cannot ``generate``;
    it serves the transformer to an outside sampler (ComfyUI's MODEL path, where the user's own
    CLIP and VAE nodes do the rest).

    Valid by construction (``__post_init__`` runs :meth:`validate`): a ``ModelSource`` that exists
    names one complete source, so no layer below checks it again. Whether the files exist and fit is
    the loader's job (it reads them).
    """

    diffusers_dir: str | None = None
    transformer: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    vae: str | None = None
    tokenizer_dir: str | None = None
    transformer_only: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike[str]) -> ModelSource:
        return cls(diffusers_dir=str(Path(path).expanduser().resolve()))

    @classmethod
    def from_single_files(
        cls,
        transformer: str | os.PathLike[str],
        clip_l: str | os.PathLike[str],
        t5xxl: str | os.PathLike[str],
        vae: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str] | None = None,
    ) -> ModelSource:
        def norm(p: str | os.PathLike[str]) -> str:
            return str(Path(p).expanduser().resolve())

        return cls(
            transformer=norm(transformer),
            clip_l=norm(clip_l),
            t5xxl=norm(t5xxl),
            vae=norm(vae),
            tokenizer_dir=norm(tokenizer_dir) if tokenizer_dir else None,
        )

    @classmethod
    def transformer_alone(cls, path: str | os.PathLike[str]) -> ModelSource:
        """Only the transformer: ``path`` is a diffusers Flux folder or a single transformer file."""
        p = Path(path).expanduser().resolve()
        if p.is_dir():
            return cls(diffusers_dir=str(p), transformer_only=True)
        return cls(transformer=str(p), transformer_only=True)

    @property
    def kind(self) -> Literal["diffusers", "single_file"]:
        return "diffusers" if self.diffusers_dir else "single_file"

    def validate(self) -> None:
        if self.transformer_only:
            if bool(self.diffusers_dir) == bool(self.transformer) or any((self.clip_l, self.t5xxl, self.vae)):
                raise OptionsError(
                    "A transformer-only model needs exactly one of a diffusers folder or a transformer file, "
                    "and no text encoder or VAE files."
                )
            return
        singles = (self.transformer, self.clip_l, self.t5xxl, self.vae)
        if self.diffusers_dir and any(singles):
            raise OptionsError(
                "Give either a diffusers folder or single files (transformer, clip_l, t5xxl, vae), "
                "not both."
            )
        if not self.diffusers_dir and not all(singles):
            missing = [n for n, v in zip(("transformer", "clip_l", "t5xxl", "vae"), singles) if not v]
            raise OptionsError(
                "No model given. Pass a diffusers Flux folder, or all four single files; "
                f"missing: {', '.join(missing)}."
            )

    def describe(self) -> str:
        if self.transformer_only:
            return f"{self.diffusers_dir or self.transformer} (transformer only)"
        if self.diffusers_dir:
            return self.diffusers_dir
        return f"transformer={self.transformer} clip_l={self.clip_l} t5xxl={self.t5xxl} vae={self.vae}"


@dataclass(frozen=True)
class EngineOptions:
    """How to optimise the pipeline. Hashable; part of the registry key.

    quantization: transformer weights. ``auto`` (default) is ``fp8`` where it is fast and safe
        (CUDA with compute capability >= 8.9, bfloat16, no offload, torchao installed) and ``none``
        everywhere else; the engine logs and reports what it chose. ``fp8`` is torchao float8
        dynamic activation + weight, per-row scales (on the H200: 2.82 s vs 3.79 s per 28-step
        loop in bf16, benchmarks/RESULTS.md). ``fp8_weight_only`` and ``int8_weight_only`` are
        the fallbacks for other devices (CPU included).
    t5_quantization: T5 encoder via bitsandbytes (``nf4`` / ``int8``). ``auto`` (default) is
        ``nf4`` on GPUs with less than 30 GiB (24 GB cards: the T5 shrinks from 9.5 to ~4 GB and
        the fp8 pipeline fits: 17.9 GiB peak measured before T5's ``wo`` layers stayed unquantised,
        ~1.4 GiB more by arithmetic since) when bitsandbytes is installed and nothing is
        offloaded, ``none`` otherwise.
    attention: ``auto`` is PyTorch's SDPA with its own kernel dispatch (on Hopper it already
        picks cuDNN / flash; nothing is probed or timed); explicit choices fail clearly when
        unavailable. ``cudnn_fp8`` (opt-in; Hopper or newer, ``nvidia-cudnn-frontend``): cuDNN's
        FP8 attention, 2.95 -> 2.76 s per image on the H200, less exact (``fastlora_core.fp8_attention``).
    compile: ``full`` compiles the whole transformer, ``regional`` each repeated block (much
        faster to compile, nearly the same speed).
    offload: ``model`` moves whole components to the GPU when used; ``sequential`` streams layers.
    swap_strategy: ``fused`` merges LoRA deltas into the weights (no per-step cost, any rank or
        target); ``adapter`` keeps PEFT LoRA layers padded to ``max_rank`` (the published recipe).
    max_rank: adapter slot rank (``adapter`` strategy only).
    device: ``auto`` (cuda when available) or an explicit torch device string.
    compile_cache_dir: persistent inductor cache; empty means the per-user default.
    dynamic_shapes: compile with dynamic shapes (one compile for every size; +2.7 % per loop on the H200).
    deterministic: the same request gives the same image bit for bit, in every process. Off by
        default: without it, images after a process's first are identical (with background
        compilation, decision 41, after its first compiled image) but the first image and
        other processes may differ slightly (up to 0.027 on the 0..1 scale at 1024x1024, H200); with
        it, every image of every process was identical, at +57 to +75 % per image (H200, fp8,
        benchmarks/RESULTS.md). It switches PyTorch's deterministic algorithms on for the whole
        process (other models in the same process are affected) until the engine is released.
    """

    quantization: Quantization = "auto"
    t5_quantization: T5Quantization = "auto"
    attention: Attention = "auto"
    compile: CompileMode = "regional"
    offload: Offload = "none"
    dtype: DType = "bfloat16"
    swap_strategy: SwapStrategy = "fused"
    max_rank: int = 128
    device: str = "auto"
    compile_cache_dir: str = ""
    dynamic_shapes: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Static checks that need no device, run when the options are made (so an
        ``EngineOptions`` that exists is valid, as torchao's configs are). Raises OptionsError
        saying what to change.
        Device-dependent checks and the ``auto`` choices: ``optimize.resolve``."""
        for name, value, allowed in (
            ("quantization", self.quantization, QUANTIZATIONS),
            ("t5_quantization", self.t5_quantization, T5_QUANTIZATIONS),
            ("attention", self.attention, ATTENTIONS),
            ("compile", self.compile, COMPILE_MODES),
            ("offload", self.offload, OFFLOADS),
            ("dtype", self.dtype, DTYPES),
            ("swap_strategy", self.swap_strategy, SWAP_STRATEGIES),
        ):
            if value not in allowed:
                raise OptionsError(f"{name}={value!r} is not one of {', '.join(allowed)}.")
        if not isinstance(self.max_rank, int) or not 1 <= self.max_rank <= 1024:
            raise OptionsError(f"max_rank={self.max_rank!r} must be an integer between 1 and 1024.")
        if self.quantization not in ("none", "auto") and self.offload != "none":
            raise OptionsError(
                f"quantization={self.quantization} cannot be combined with offload={self.offload}: "
                "torchao-quantised weights cannot be moved between CPU and GPU by the offload hooks. "
                "Use offload=none (quantise T5 with t5_quantization=nf4 to fit 24 GB), or "
                "quantization=none with offload."
            )
        if self.quantization == "fp8" and self.dtype != "bfloat16":
            raise OptionsError(
                f"quantization=fp8 (per-row float8) needs dtype=bfloat16, not {self.dtype}."
            )
        if self.offload == "sequential" and self.compile != "off":
            raise OptionsError(
                "offload=sequential streams weights layer by layer and cannot be compiled. Use "
                "compile=off with sequential offload, or offload=model with compile."
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
            or self.device == "mps"
        ):
            raise OptionsError(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps.")


#: Largest |strength| accepted: ComfyUI's own LoraLoader allows -100..100 (graphs that use it must
#: run), and beyond that a LoRA's delta swamps the model's weights (and can overflow bf16 merges).
MAX_LORA_STRENGTH = 100.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength. ``path`` is absolute.

    The strength is checked on construction (a finite number with ``|strength| <=
    MAX_LORA_STRENGTH``), so a bad value from a headless API call is refused before any weight is
    touched, whatever range a widget shows.
    """

    path: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise OptionsError(f"LoRA {Path(self.path).name}: strength={s!r} is not a number.")
        if not math.isfinite(s) or abs(s) > MAX_LORA_STRENGTH:
            raise OptionsError(
                f"LoRA {Path(self.path).name}: strength={s!r} is out of range. Use a finite number "
                f"between -{MAX_LORA_STRENGTH:g} and {MAX_LORA_STRENGTH:g} (1.0 is the LoRA as trained; "
                "0 disables it)."
            )

    @classmethod
    def of(cls, path: str | os.PathLike[str], strength: float = 1.0) -> LoraSpec:
        resolved = str(Path(path).expanduser().resolve())
        try:
            if isinstance(strength, bool):
                raise TypeError("a bool is not a strength")
            value = float(strength)
        except (TypeError, ValueError) as exc:
            raise OptionsError(f"LoRA {Path(resolved).name}: strength={strength!r} is not a number.") from exc
        return cls(resolved, value)


@dataclass(frozen=True)
class LoraStack:
    """The LoRAs that should be active, in order. Entries with strength 0 are dropped."""

    entries: tuple[LoraSpec, ...] = ()

    @classmethod
    def of(cls, *items: LoraSpec | tuple[str, float] | str) -> LoraStack:
        out: list[LoraSpec] = []
        for item in items:
            if isinstance(item, LoraSpec):
                out.append(item)
            elif isinstance(item, str):
                out.append(LoraSpec.of(item))
            else:
                out.append(LoraSpec.of(item[0], item[1]))
        return cls(tuple(out))

    def plus(self, spec: LoraSpec) -> LoraStack:
        return LoraStack(self.entries + (spec,))

    def active(self) -> tuple[LoraSpec, ...]:
        return tuple(e for e in self.entries if e.strength != 0.0)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> list[dict[str, object]]:
        return [{"file": Path(e.path).name, "strength": e.strength} for e in self.entries]


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str = "a photo of a cat"
    seed: int = 0
    steps: int = 28
    guidance: float = 3.5
    width: int = 1024
    height: int = 1024
    batch: int = 1
    max_sequence_length: int = 512

    def validate(self) -> None:
        if self.steps < 1:
            raise OptionsError(f"steps={self.steps}: need at least 1 step.")
        if self.batch < 1:
            raise OptionsError(f"batch={self.batch}: need at least 1 image.")
        for name, v in (("width", self.width), ("height", self.height)):
            if v < 16 or v % 16:
                raise OptionsError(f"{name}={v}: Flux needs a multiple of 16 (e.g. 1024).")


@dataclass(frozen=True)
class EngineKey:
    source: ModelSource
    options: EngineOptions = field(default_factory=EngineOptions)
