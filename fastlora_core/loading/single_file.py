"""Single files -> ``FluxPipeline``: plans checked against each other, a dry run on meta tensors
of the header shapes, then the weights read, cast and converted one tensor at a time."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from ..errors import ModelLoadError
from ..specs import ModelSource
from . import direct, own
from .diffusers_folder import _finish
from .header import Header, read_header
from .keymaps import _bfl_to_diffusers, _ldm_vae_to_diffusers
from .plans import (
    _ROLE_HELP,
    COMPONENT_OF,
    Role,
    _check_fit,
    _fail,
    _Plan,
    _plan_clip,
    _plan_t5,
    _plan_transformer,
    _plan_vae,
    load_shipped_config,
)
from .tokenizers import _load_tokenizers, find_tokenizer_dirs

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Building modules
# --------------------------------------------------------------------------------------------------


def _empty_module(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device (buffers stay real), without init cost."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _factory(plan: _Plan, dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    if plan.role == "transformer":
        from diffusers import FluxTransformer2DModel

        # from_config: a diffusers folder's config.json also names its class and version
        return lambda: FluxTransformer2DModel.from_config(plan.config)
    if plan.role == "vae":
        from diffusers import AutoencoderKL

        cfg = {k: v for k, v in plan.config.items() if not k.startswith("_")}
        return lambda: AutoencoderKL(**cfg)  # type: ignore[return-value]
    if plan.role == "clip_l":
        from transformers import CLIPTextConfig, CLIPTextModel

        ccfg = {k: v for k, v in plan.config.items() if k not in ("architectures", "model_type")}
        return lambda: CLIPTextModel(_with_dtype(CLIPTextConfig(**ccfg), dtype))
    from transformers import T5Config, T5EncoderModel

    tcfg = {k: v for k, v in plan.config.items() if k not in ("architectures", "model_type", "is_gated_act")}
    return lambda: T5EncoderModel(_with_dtype(T5Config(**tcfg), dtype))


def _with_dtype(config: Any, dtype: torch.dtype) -> Any:
    """Record the weights' dtype in a transformers config as from_pretrained does (``dtype`` in
    transformers 5, ``torch_dtype`` before)."""
    import transformers

    attr = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    setattr(config, attr, dtype)
    return config


def _fp32_names(module: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names transformers keeps in float32 at this dtype (T5's ``wo`` at fp16), mirroring
    ``from_pretrained`` so both load paths produce the same dtypes."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(names)


def _convert(plan: _Plan, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """File state dict (prefix stripped, markers dropped, scales applied) -> module state dict."""
    if plan.role == "transformer" and plan.layout == "bfl":
        return _bfl_to_diffusers(sd, plan.config["num_attention_heads"] * plan.config["attention_head_dim"])
    if plan.role == "vae" and plan.layout == "ldm":
        return _ldm_vae_to_diffusers(sd, len(plan.config["block_out_channels"]))
    if plan.role == "t5xxl":
        sd = dict(sd)
        if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
            sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
        if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:
            sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    return sd, []


def _collect(plan: _Plan, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
             keep_fp32: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read (or fake, in the dry run) the file's tensors, apply fp8 scales, cast, and convert to the
    module's key layout. ``get`` returns a file tensor by its full key. Each tensor is cast as soon
    as it is read, so peak memory is the result plus one tensor (e.g. fp8 -> bf16 never holds both
    copies of the model)."""
    pre = plan.prefix
    names = [k[len(pre):] for k in plan.header.tensors if k.startswith(pre)]
    scale_keys = {n for n in names if n.endswith((".scale_weight", ".weight_scale"))}
    sd: dict[str, torch.Tensor] = {}
    for n in names:
        if n in plan.drop_keys or n in scale_keys:
            continue
        t = get(pre + n)
        for sk in (n[: -len("weight")] + "scale_weight", n[: -len("weight")] + "weight_scale"):
            if n.endswith(".weight") and sk in scale_keys:
                s = get(pre + sk)
                if s.numel() != 1 and tuple(s.shape) not in ((t.shape[0], 1), (t.shape[0],)):
                    raise _fail(plan.role, plan.header, f"has a weight scale of shape {tuple(s.shape)} for {n}.",
                                "Only per-tensor or per-row scaled fp8 is supported; use the bf16/fp8 release.")
                s = s.float().reshape(-1, *([1] * (t.dim() - 1))) if s.numel() != 1 else s.float().reshape(())
                t = t.float() * s
        # T5 keeps its file names, so the from_pretrained fp32 rule (``wo`` at fp16) applies here.
        target = torch.float32 if keep_fp32 and any(m in n.split(".") for m in keep_fp32) else dtype
        sd[n] = t if t.dtype == target else t.to(target)
        del t
    converted, unknown = _convert(plan, sd)
    if unknown:
        raise _fail(plan.role, plan.header, f"has {len(unknown)} tensor(s) this model does not use (e.g. "
                    f"{', '.join(sorted(unknown)[:3])}).",
                    "It is probably a different model variant; use a standard Flux.1 file.")
    return converted


def _adapt_to_module(plan: _Plan, module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP: the file's keys are kept without ``text_model.``; transformers 4's CLIPTextModel wants
    it, transformers 5's does not."""
    if plan.role == "clip_l" and hasattr(module, "text_model") and "text_model.embeddings.token_embedding.weight" in (
            module.state_dict()) and not any(k.startswith("text_model.") for k in sd):
        return {"text_model." + k: v for k, v in sd.items()}
    return sd


def _check_against(plan: _Plan, module: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        bits = []
        if missing:
            bits.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            bits.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            bits.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)})")
        names = " (diffusers names)" if plan.layout in ("bfl", "ldm") else ""
        raise _fail(plan.role, plan.header, f"does not match the model it describes{names}: " + "; ".join(bits) + ".",
                    "The file is incomplete (one shard of a split model?) or a different model variant; use the "
                    f"complete file ({_ROLE_HELP[plan.role]}).")


def direct_jobs(plan: _Plan, shards: Sequence[Header] = ()) -> list[tuple[Header, list[str], str]]:
    """What :func:`_build` reads straight to a device for ``plan``: per file, its header, the names of
    its tensors the plan uses and the role (the jobs of :class:`.direct.BackgroundReads`)."""
    return [(header, [k for k in header.tensors if k.startswith(plan.prefix)], plan.role)
            for header in shards or (plan.header,)]


def _build(plan: _Plan, dtype: torch.dtype, dry_run: bool, device: torch.device | None = None,
           shards: Sequence[Header] = (), reads: direct.BackgroundReads | None = None,
           own_modules: bool = False) -> torch.nn.Module | None:
    """Dry run: convert meta tensors of the header shapes and compare with the module's state dict.
    Real run: read, convert, cast and assign the weights. Returns the module (None in a dry run).
    ``device``: read the file's tensors straight into that device's memory (:func:`.direct.read_tensors`)
    and cast and convert them there; otherwise through ``safe_open`` on the CPU. ``shards``: the
    files to read when ``plan.header`` merges several (a sharded diffusers component).
    ``reads``: reads already under way (started with :func:`direct_jobs`); the files are taken from it.
    ``own_modules``: build FastLoRA's own module for the role (:mod:`.own`) instead of the diffusers /
    transformers class."""
    module = own.empty(own.factory(plan)) if own_modules else _empty_module(_factory(plan, dtype))
    keep_fp32 = _fp32_names(module, dtype)
    if dry_run:
        info = plan.header.tensors

        def get(k: str) -> torch.Tensor:
            return torch.empty(info[k].shape, dtype=info[k].torch_dtype, device="meta")

        _check_against(plan, module, _adapt_to_module(plan, module, _collect(plan, get, dtype, keep_fp32)))
        return None
    from safetensors import safe_open

    try:
        if device is not None:
            raw: dict[str, torch.Tensor] = {}
            for header, wanted, role in direct_jobs(plan, shards):
                raw.update(reads.take(header, wanted, role) if reads is not None
                           else direct.read_tensors(header, wanted, device, role=role))
            sd = _collect(plan, raw.pop, dtype, keep_fp32)  # pop: each file tensor freed once converted
            del raw
        else:
            with contextlib.ExitStack() as files:
                handles = [files.enter_context(safe_open(str(h.path), framework="pt", device="cpu"))
                           for h in (shards or (plan.header,))]
                where = {k: f for f in handles for k in f.keys()}
                sd = _collect(plan, lambda k: where[k].get_tensor(k), dtype, keep_fp32)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - I/O or decoding failure while reading
        raise _fail(plan.role, plan.header, f"could not be read ({e}).", "Download it again.") from e
    sd = _adapt_to_module(plan, module, sd)
    _check_against(plan, module, sd)
    if plan.role == "t5xxl" and "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # keep the tie: one tensor
    module.load_state_dict(sd, strict=True, assign=True)
    if plan.role == "t5xxl":
        module.encoder.embed_tokens = module.shared  # type: ignore[union-attr]
    left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
    if left:  # pragma: no cover - guarded by _check_against
        raise _fail(plan.role, plan.header, f"left {len(left)} tensors unset ({left[0]}).", "Report this as a bug.")
    module.eval().requires_grad_(False)
    return module




# -- single files -----------------------------------------------------------------------------------


def _load_single_files(source: ModelSource, dtype: torch.dtype, device: torch.device | None = None,
                       on_device: Collection[str] = (), own_modules: bool = False) -> Any:
    """``device``: the files of the components in ``on_device`` are read straight into that device's
    memory; the others load on the CPU. ``own_modules``: FastLoRA's own modules and sampler
    (:mod:`.own`) instead of diffusers' pipeline."""
    paths: dict[Role, str] = {"transformer": source.transformer or "", "clip_l": source.clip_l or "",
                              "t5xxl": source.t5xxl or "", "vae": source.vae or ""}
    headers = {role: read_header(p, role) for role, p in paths.items()}
    plans = {
        "transformer": _plan_transformer(headers["transformer"]),
        "clip_l": _plan_clip(headers["clip_l"]),
        "t5xxl": _plan_t5(headers["t5xxl"]),
        "vae": _plan_vae(headers["vae"]),
    }
    _check_fit(plans)
    with background_reads([(plan, ()) for plan in plans.values() if COMPONENT_OF[plan.role] in on_device],
                          device) as reads:
        return _single_files_pipeline(source, plans, dtype, device, on_device, reads, own_modules)


def background_reads(plans: Sequence[tuple[_Plan, Sequence[Header]]], device: torch.device | None
                     ) -> contextlib.AbstractContextManager[direct.BackgroundReads | None]:
    """The direct reads of ``plans`` (each with its shards, ``()`` for a single file) started on a
    thread of their own (:class:`.direct.BackgroundReads`, decision 37), or a do-nothing context when
    there is no device to read to."""
    if device is None or not plans or not direct.BACKGROUND:
        return contextlib.nullcontext(None)
    return direct.BackgroundReads([job for plan, shards in plans for job in direct_jobs(plan, shards)], device)


def _single_files_pipeline(source: ModelSource, plans: dict[str, _Plan], dtype: torch.dtype,
                           device: torch.device | None, on_device: Collection[str],
                           reads: direct.BackgroundReads | None, own_modules: bool = False) -> Any:
    """The rest of :func:`_load_single_files` once the plans fit (the reads may be under way)."""
    clip_d, t5_d = find_tokenizer_dirs(source.tokenizer_dir)
    clip_len = int(plans["clip_l"].config["max_position_embeddings"])
    clip_tok: Any
    t5_tok: Any
    clip_tok, t5_tok = own.tokenizers(clip_d, t5_d, clip_len) if own_modules else _load_tokenizers(clip_d, t5_d, clip_len)
    sizes = (len(clip_tok), len(t5_tok))
    if sizes[0] > plans["clip_l"].config["vocab_size"] or sizes[1] > plans["t5xxl"].config["vocab_size"]:
        raise ModelLoadError(f"The tokenizers in {clip_d.parent} do not match the text encoders (vocabulary "
                             f"{sizes[0]}/{sizes[1]} vs {plans['clip_l'].config['vocab_size']}/"
                             f"{plans['t5xxl'].config['vocab_size']}). Use the tokenizers that belong to these files.")
    for plan in plans.values():  # full dry run on meta tensors: nothing has been read yet
        _build(plan, dtype, dry_run=True, own_modules=own_modules)
    for plan in plans.values():
        for pre in plan.ignored_prefixes:
            logger.info("%s: ignoring the '%s*' tensors in %s", plan.role, pre, plan.header.path.name)

    modules = {plan.role: _build(plan, dtype, dry_run=False, device=device if COMPONENT_OF[plan.role] in on_device
                                 else None, reads=reads, own_modules=own_modules) for plan in plans.values()}
    sched_name = "scheduler_dev" if plans["transformer"].config["guidance_embeds"] else "scheduler_schnell"
    sched_cfg = {k: v for k, v in load_shipped_config(sched_name).items() if not k.startswith("_")}
    keep = on_device if device is not None else ()
    if own_modules:
        runtime = own.pipeline({COMPONENT_OF[role]: m for role, m in modules.items()}, clip_tok, t5_tok, sched_cfg)
        _finish(runtime, keep=keep)
        logger.info("loaded Flux from single files with FastLoRA's own modules (%s): %s", dtype, source.describe())
        return runtime

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched_cfg),
        text_encoder=modules["clip_l"],
        tokenizer=clip_tok,
        text_encoder_2=modules["t5xxl"],
        tokenizer_2=t5_tok,
        vae=modules["vae"],
        transformer=modules["transformer"],
    )
    _finish(pipe, keep=keep)
    logger.info("loaded Flux pipeline from single files (%s): %s", dtype, source.describe())
    return pipe




