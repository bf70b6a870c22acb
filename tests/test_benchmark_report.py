"""benchmarks/report.py: the tables in RESULTS.md come from the JSON the H200 runs wrote."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "benchmarks" / "results").glob("2026-11-29-s7-call*.json"))


def _report():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fastlora_bench_report", ROOT / "benchmarks" / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs() -> list[dict]:
    assert len(RUNS) >= 5, "the H200 result files of 2026-11-29 are part of the repository"
    return [json.loads(p.read_text()) for p in RUNS]


def test_side_by_side_and_target_status_come_from_the_numbers() -> None:
    report = _report()
    text = report.render(_runs(), [p.name for p in RUNS])
    lines = text.splitlines()

    def row(start: str) -> str:
        return next(line for line in lines if line.startswith(start))

    assert "| 5.619 | 1.00x |" in row("| baseline: bf16 eager")
    assert "| 3.105 | 1.81x |" in row("| **the recipe**")
    assert "**2.824** | **1.99x**" in row("| **our engine**")
    assert "| 3.791 | 1.48x |" in row("| our engine, `quantization=none`")
    assert row("| <= 2.0 s / loop").endswith("**not met** |")
    assert "41.4 ms" in row("| swap <= 50 ms") and row("| swap <= 50 ms").endswith("**met** |")
    assert "22 swaps, 0 new compiles" in row("| 0 recompiles")
    assert row("| 24 GB consumer recipe fits").endswith("**met** |")


def test_status_follows_the_figures_and_missing_ones_say_so() -> None:
    report = _report()
    runs = copy.deepcopy(_runs())
    cold = next(r for r in runs if "engine_cold" in r["groups"])["groups"]["engine_cold"]["engine"]
    cold["swaps"]["r64_from_ram_ms_median"] = 75.0
    cold["swap_sequence"]["new_compiles"] = 2
    text = report.render(runs, ["edited"])
    assert "| swap <= 50 ms, rank 64, RAM cache, fp8 | 75.0 ms (median) | **not met** |" in text
    assert "22 swaps, 2 new compiles | **not met** |" in text
    without_recipe = [r for r in runs if "fp8_adapter" not in r["groups"]]
    assert "| **the recipe**: fp8 + regional compile + PEFT hotswap (rank 64) | not measured |" in \
        report.render(without_recipe, ["partial"])


def test_write_replaces_only_the_generated_section(tmp_path: Path) -> None:
    report = _report()
    doc = tmp_path / "RESULTS.md"
    doc.write_text(f"# Title\n\nby hand before\n\n{report.START}\nold table\n{report.END}\n\nby hand after\n")
    report.main([*map(str, RUNS), "--write", str(doc)])
    text = doc.read_text()
    assert "old table" not in text and "by hand before" in text and "by hand after" in text
    assert text.count(report.START) == 1 and "| **our engine**" in text
