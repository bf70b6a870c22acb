"""The command line: demo summary, generate with real files, write-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastlora_core.cli import main, parse_lora_arg, run_demo


def test_demo_writes_images_and_a_summary_with_every_swap(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(out, compile_mode="off")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["recompiles"] == 0 and on_disk["all_within_tolerance"] is True
    strategies = [r["strategy"] for r in on_disk["runs"]]
    assert strategies == ["fused", "adapter"]
    for run in on_disk["runs"]:
        assert len(run["swaps"]) >= 7
        for swap in run["swaps"]:
            assert set(swap) >= {"strategy", "stack", "swap_ms", "new_compiles", "max_abs_diff"}
            assert swap["max_abs_diff"] <= summary["tolerance"]
            assert all(Path(p).exists() for p in swap["images"])
        ranks_and_stacks = [len(s["stack"]) for s in run["swaps"]]
        assert 2 in ranks_and_stacks  # a stack of two
    adapter = on_disk["runs"][1]
    assert "PadDummyLora" in adapter["refused"]["error"] and adapter["refused"]["unchanged_after_refusal"]


def test_generate_command_with_lora_stack(tmp_path: Path, tiny_dir: Path, tiny_loras: dict[str, str]) -> None:
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "a fox", "--steps", "2", "--width", "64",
               "--height", "64", "--lora", tiny_loras["fastlora-tiny-style"] + ":0.8",
               "--lora", tiny_loras["fastlora-tiny-character"], "--compile", "off", "--dtype", "float32",
               "--device", "cpu", "--repeat", "2", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["fastlora_0.png", "fastlora_1.png", "timings.json"]
    timings = json.loads((out / "timings.json").read_text())
    engine = timings["engine"]
    # where the start-up went: every build phase, then the first LoRA and the first image
    assert {"checks", "setup", "read", "t5", "transformer", "move_rest", "build", "first_lora", "first_image"} <= set(engine)  # masters: fp8 only
    assert all(v >= 0 for v in engine.values())
    build_phases = sum(engine[k] for k in ("read", "masters", "t5", "transformer", "move_rest") if k in engine)
    assert build_phases <= engine["build"] + 0.01
    # this pytest process started before the command: its age covers imports, build and first image
    assert timings["process_start_to_first_image_s"] >= engine["build"] + engine["first_image"]
    assert timings["imports_s"] >= 0 and len(timings["steady_image_s"]) == 1


def test_generate_reports_bad_input_without_traceback(tmp_path: Path, tiny_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--lora", str(tmp_path / "missing.safetensors"),
               "--compile", "off", "--device", "cpu", "--dtype", "float32", "--steps", "1", "--width", "64",
               "--height", "64", "--out", str(tmp_path)])
    assert rc == 2
    assert "missing.safetensors" in caplog.text


def test_write_tiny_comfy_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["write-tiny", str(tmp_path / "models"), "--comfy"]) == 0
    models = tmp_path / "models"
    assert (models / "diffusers" / "fastlora-tiny-flux" / "model_index.json").exists()
    loras = sorted(p.name for p in (models / "loras").iterdir())
    assert "fastlora-tiny-style.safetensors" in loras and len(loras) >= 3
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["diffusers"].endswith("fastlora-tiny-flux")
    # the same model as the single files a ComfyUI user has, where ComfyUI looks for them
    singles = manifest["single_files"]
    assert singles == {"transformer": str(models / "diffusion_models" / "fastlora-tiny-flux.safetensors"),
                       "clip_l": str(models / "text_encoders" / "fastlora-tiny-clip_l.safetensors"),
                       "t5xxl": str(models / "text_encoders" / "fastlora-tiny-t5xxl.safetensors"),
                       "vae": str(models / "vae" / "fastlora-tiny-ae.safetensors"),
                       "tokenizer_dir": str(models / "fastlora-tiny-tokenizers")}
    import torch

    from fastlora_core.loading import load_pipeline
    from fastlora_core.specs import ModelSource

    files = load_pipeline(ModelSource.from_single_files(**singles), torch.float32)
    folder = load_pipeline(ModelSource.from_diffusers(manifest["diffusers"]), torch.float32)
    for name in ("transformer", "vae"):
        a, b = getattr(files, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # text encoders take the token ids of ComfyUI's bundled CLIP-L and T5 tokenizers
    assert files.text_encoder.get_input_embeddings().num_embeddings == 49408
    assert files.text_encoder_2.get_input_embeddings().num_embeddings == 32128


def test_lora_argument_parsing() -> None:
    assert parse_lora_arg("/a/b.safetensors:0.5").strength == 0.5
    assert parse_lora_arg("/a/b.safetensors").strength == 1.0
    assert parse_lora_arg("/a/b.safetensors").path.endswith("b.safetensors")
