"""Human tables from benchmark JSON: baseline, recipe and our engine side by side, and the issue's
targets with a status computed from the numbers.

    python benchmarks/report.py benchmarks/results/2026-11-29-s7-call*.json            # print
    python benchmarks/report.py benchmarks/results/2026-11-29-s7-call*.json --write benchmarks/RESULTS.md

``--write`` replaces the text between ``<!-- report:start -->`` and ``<!-- report:end -->`` in that file
(explanations written by people stay outside the markers). Each input is one ``bench_flux.py`` run
(``{"command", "groups": {name: worker JSON}}``); when several runs hold the same figure, the later
file on the command line wins. ``bench_flux.py`` prints this report and writes it beside its JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- report:start -->", "<!-- report:end -->"

TARGET_LOOP_S = 2.0
TARGET_SPEEDUP = 2.75
TARGET_LORA_OVERHEAD = 0.01
TARGET_SWAP_MS = 50.0
TARGET_MIN_SWAPS = 20
TARGET_FIRST_COLD_S = 30.0
TARGET_FIRST_WARM_S = 10.0
CONSUMER_GIB = 24.0


def merge(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """group name -> worker JSON, later runs overriding earlier ones key by key."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, data in run.get("groups", {}).items():
            into = groups.setdefault(name, {})
            for key, value in data.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    into[key] = {**into[key], **value}
                else:
                    into[key] = value
    return groups


def get(groups: dict[str, Any], path: str) -> Any:
    d: Any = groups
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _s(value: Any, fmt: str = "{:.3f}", unit: str = "") -> str:
    return "not measured" if value is None else fmt.format(value) + unit


def figures(groups: dict[str, Any]) -> dict[str, Any]:
    g = lambda path: get(groups, path)  # noqa: E731
    f = {
        "baseline": g("eager.eager.bf16_eager_peft_r64.median_s"),
        "baseline_nolora": g("eager.eager.bf16_eager_nolora.median_s"),
        "bf16_hotswap": g("bf16_adapter.bf16_adapter.loop_lora_A64.median_s"),
        "bf16_hotswap_compile": g("bf16_adapter.bf16_adapter.compile_first_forward_s"),
        "recipe": g("fp8_adapter.fp8_adapter.loop_lora_A64.median_s"),
        "recipe_compile": g("fp8_adapter.fp8_adapter.compile_first_forward_s"),
        "recipe_hotswap_ms": g("fp8_adapter.fp8_adapter.hotswap_ms_from_gpu_state_dict"),
        "reference_fused": g("fp8_fused.fp8_fused.loop_lora_A64.median_s"),
        "reference_fused_compile": g("fp8_fused.fp8_fused.compile_first_forward_s"),
        "reference_fused_cudagraph": g("fp8_fused.fp8_fused.loop_lora_A64_cudagraph.median_s"),
        "reference_fused_attn8": g("fp8_fused.fp8_fused.loop_lora_A64_attn8.median_s"),
        "fqkv_nolora": g("fp8_fqkv.fp8_fqkv.loop_nolora.median_s"),
        "fqkv_nolora_cudagraph": g("fp8_fqkv.fp8_fqkv.loop_nolora_cudagraph.median_s"),
        "engine": g("engine_cold.engine.engine_transformer_loop.median_s"),
        "engine_nolora": g("engine_cold.engine.engine_transformer_loop_nolora.median_s"),
        "engine_first_cold": g("engine_cold.engine.first_image_s_incl_engine_build"),
        "engine_first_warm": g("engine_warm.engine.first_image_s_incl_engine_build"),
        "engine_e2e": g("engine_cold.engine.e2e_s_per_image"),
        "baseline_e2e": g("engine_cold.engine.baseline_e2e_bf16_eager_peft_s"),
        "engine_swap_ms": g("engine_cold.engine.swaps.r64_from_ram_ms_median"),
        "engine_sequence": g("engine_cold.engine.swap_sequence"),
        "engine_peak": g("engine_cold.engine.peak_gib"),
        "engine_options": g("engine_cold.engine.resolved_options") or g("engine_cold.engine.options"),
        "consumer": g("engine_consumer24.engine"),
    }
    f["errors"] = {name: data["errors"] for name, data in groups.items() if data.get("errors")}
    f["variants"] = {name[len("engine_"):]: data.get("engine", {}) for name, data in groups.items()
                     if name.startswith("engine_") and name not in ("engine_cold", "engine_warm", "engine_consumer24")}
    return f


def _fields(options_repr: str | None) -> dict[str, str]:
    import re

    return dict(re.findall(r"(\w+)=('[^']*'|[\w.]+)", options_repr or ""))


def option_changes(options_repr: str | None, reference_repr: str | None) -> str:
    """``a=x, b=y`` for the fields of ``options_repr`` that differ from ``reference_repr``."""
    ref = _fields(reference_repr)
    diff = [f"{k}={v.strip(chr(39))}" for k, v in _fields(options_repr).items()
            if k != "compile_cache_dir" and ref.get(k) != v]
    return ", ".join(diff) or "same options"


def _speedup(base: float | None, x: float | None) -> str:
    return "" if base is None or x is None else f"{base / x:.2f}x"


def side_by_side(f: dict[str, Any]) -> list[str]:
    base = f["baseline"]
    hs = f["recipe_hotswap_ms"] or {}
    rows = [
        "| configuration | s / 28-step loop, LoRA r64 active | vs baseline | first image / compile |",
        "|---|---|---|---|",
        f"| baseline: bf16 eager, LoRA as PEFT layers | {_s(base)} | 1.00x | — |",
        f"| bf16 eager, no LoRA | {_s(f['baseline_nolora'])} | {_speedup(base, f['baseline_nolora'])} | — |",
        f"| recipe step: bf16 + regional compile + PEFT hotswap (rank 64) | {_s(f['bf16_hotswap'])} | "
        f"{_speedup(base, f['bf16_hotswap'])} | {_s(f['bf16_hotswap_compile'], '{:.1f}', ' s compile')} |",
        f"| **the recipe**: fp8 + regional compile + PEFT hotswap (rank 64) | {_s(f['recipe'])} | "
        f"{_speedup(base, f['recipe'])} | {_s(f['recipe_compile'], '{:.1f}', ' s compile')}"
        + (f"; hotswap {min(hs.values()):.0f}-{max(hs.values()):.0f} ms" if hs else "") + " |",
        f"| reference fused (fp8, regional, merged + re-quantised in place) | {_s(f['reference_fused'])} | "
        f"{_speedup(base, f['reference_fused'])} | {_s(f['reference_fused_compile'], '{:.1f}', ' s compile')} |",
    ]
    for label, key in (("reference fused + whole-forward CUDA graph", "reference_fused_cudagraph"),
                       ("reference fused + cuDNN FP8 attention", "reference_fused_attn8"),
                       ("fp8 regional, fused QKV projections, no LoRA", "fqkv_nolora"),
                       ("fused QKV, no LoRA, + whole-forward CUDA graph", "fqkv_nolora_cudagraph")):
        if f[key] is not None:  # optional phases: a row only when measured
            rows.append(f"| {label} | {_s(f[key])} | {_speedup(base, f[key])} | |")
    rows.append(f"| **our engine** (options above) | **{_s(f['engine'])}** | **{_speedup(base, f['engine'])}** | "
                f"{_s(f['engine_first_cold'], '{:.1f}', ' s')} cold, {_s(f['engine_first_warm'], '{:.1f}', ' s')} "
                "warm (whole first image) |")
    for name, v in sorted(f["variants"].items()):
        loop = get(v, "loop_lora_A64.median_s")
        first = v.get("first_image_s_incl_engine_build")
        changes = option_changes(v.get("resolved_options") or v.get("options"), f["engine_options"])
        if v.get("patch"):
            changes = f"{v['patch']} (benchmark patch {name})" if changes == "same options" else \
                f"{changes}, {v['patch']}"
        rows.append(f"| our engine, `{changes}` | {_s(loop)} | {_speedup(base, loop)} | "
                    f"{_s(first, '{:.1f}', ' s')} cold |")
    c = f["consumer"]
    if c:
        loop = get(c, "engine_transformer_loop.median_s")
        rows.append(f"| our engine, 24 GB recipe under a {c.get('memory_cap_gib')} GiB cap | {_s(loop)} | "
                    f"{_speedup(base, loop)} | {_s(c.get('first_image_s_after_engine_build'), '{:.1f}', ' s')} "
                    "after the engine build |")
    return rows


def targets(f: dict[str, Any]) -> list[str]:
    def status(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**not met**")

    base, loop = f["baseline"], f["engine"]
    rows = ["| target | measured | status |", "|---|---|---|"]
    ok = None if loop is None or base is None else loop <= TARGET_LOOP_S and base / loop >= TARGET_SPEEDUP
    rows.append(f"| <= {TARGET_LOOP_S} s / loop with a LoRA (>= {TARGET_SPEEDUP}x the same-run baseline) | "
                f"{_s(loop)} s = {_speedup(base, loop) or '?'} | {status(ok)} |")
    nol = f["engine_nolora"]
    over = None if loop is None or nol is None else (loop - nol) / nol
    rows.append(f"| LoRA-active within {TARGET_LORA_OVERHEAD:.0%} of no-LoRA | {_s(loop)} vs {_s(nol)} s "
                f"({_s(None if over is None else over * 100, '{:+.1f}', ' %')}) | "
                f"{status(None if over is None else over <= TARGET_LORA_OVERHEAD)} |")
    sw = f["engine_swap_ms"]
    rows.append(f"| swap <= {TARGET_SWAP_MS:.0f} ms, rank 64, RAM cache, fp8 | {_s(sw, '{:.1f}', ' ms')} (median) | "
                f"{status(None if sw is None else sw <= TARGET_SWAP_MS)} |")
    seq = f["engine_sequence"] or {}
    n, new = seq.get("swaps"), seq.get("new_compiles")
    ok = None if n is None or new is None else n >= TARGET_MIN_SWAPS and new == 0 and not seq.get("error")
    rows.append(f"| 0 recompiles over >= {TARGET_MIN_SWAPS} swaps | {n} swaps, {new} new compiles | {status(ok)} |")
    cold, warm = f["engine_first_cold"], f["engine_first_warm"]
    rows.append(f"| first image <= {TARGET_FIRST_COLD_S:.0f} s, cold cache | {_s(cold, '{:.1f}', ' s')} | "
                f"{status(None if cold is None else cold <= TARGET_FIRST_COLD_S)} |")
    rows.append(f"| first image <= {TARGET_FIRST_WARM_S:.0f} s, warm cache | {_s(warm, '{:.1f}', ' s')} | "
                f"{status(None if warm is None else warm <= TARGET_FIRST_WARM_S)} |")
    c = f["consumer"] or {}
    fits = c.get("fits")
    ok = None if fits is None else bool(fits) and (c.get("peak_reserved_gib") or 0) <= CONSUMER_GIB
    rows.append(f"| 24 GB consumer recipe fits | cap {c.get('memory_cap_gib', '?')} GiB: peak "
                f"{c.get('peak_allocated_gib', '?')} GiB allocated, {c.get('peak_reserved_gib', '?')} GiB reserved | "
                f"{status(ok)} |")
    return rows


def render(runs: list[dict[str, Any]], sources: list[str]) -> str:
    groups = merge(runs)
    f = figures(groups)
    env = next((d.get("env") for d in groups.values() if isinstance(d.get("env"), dict)), {}) or {}
    lines = [
        f"Generated by `benchmarks/report.py` from {', '.join(f'`{s}`' for s in sources)}.",
        f"Device: {env.get('device', '?')} (sm {env.get('sm', '?')}); torch {env.get('torch', '?')}, "
        f"diffusers {env.get('diffusers', '?')}, peft {env.get('peft', '?')}, torchao {env.get('torchao', '?')}; "
        f"date {str(env.get('date', '?'))[:10]}.",
        f"Our engine's options: `{f['engine_options']}`; the variants change only what their row names."
        if f["engine_options"] else "",
        "",
        *side_by_side(f),
        "",
        *targets(f),
    ]
    if f["engine_e2e"] or f["baseline_e2e"]:
        lines += ["", f"Whole image (text encoding + 28 steps + VAE decode): baseline {_s(f['baseline_e2e'])} s, "
                      f"engine {', '.join(f'{x:.3f}' for x in f['engine_e2e'] or [])} s."]
    for name, err in sorted(f["errors"].items()):
        lines += ["", f"Error in `{name}`: {json.dumps(err)[:800]}"]
    return "\n".join(line for line in lines if line is not None) + "\n"


def write_into(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    block = f"{START}\n{text}{END}"
    if START in doc and END in doc:
        doc = doc[: doc.index(START)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc + ("\n" if doc else "") + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="bench_flux.py output JSON files, oldest first")
    p.add_argument("--write", default="", help="markdown file whose report section is replaced")
    args = p.parse_args(argv)
    runs = [json.loads(Path(r).read_text()) for r in args.runs]
    text = render(runs, [Path(r).name for r in args.runs])
    if args.write:
        write_into(Path(args.write), text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
