"""Shared fixtures: a tiny random Flux written to disk once per session, and its LoRAs.

Everything runs offline on the CPU. The inductor cache lives in a fixed per-user folder (the same
default the engine uses; one subfolder per pytest-xdist worker) so reruns compile from cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _own_cache_per_worker() -> None:
    """Under pytest-xdist (``make test`` runs two processes), each worker gets a cache folder of its own
    below the usual one, set before anything reads it, and its subprocesses inherit it: saved blocks,
    inductor's cache and the import records are then written by one process of this run, as in a serial
    run, and a test that asks what the folder holds (saved blocks or none, decisions 46-48) does not see
    what the other worker is writing at that moment."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        from fastlora_core.deps import cache_home

        os.environ["FASTLORA_CACHE_DIR"] = str(cache_home() / f"pytest-{worker}")


_own_cache_per_worker()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
# Tests compile several engine variants (fused, adapter, resolutions) in one process.
torch._dynamo.config.cache_size_limit = 64
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 64


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlora_core.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "fastlora-tiny-flux")


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from fastlora_core.tiny import write_tiny_loras

    return {k: str(v) for k, v in write_tiny_loras(tmp_path_factory.mktemp("loras")).items()}


@pytest.fixture(scope="session")
def tiny_source(tiny_dir: Path):  # type: ignore[no-untyped-def]
    from fastlora_core.specs import ModelSource

    return ModelSource.from_diffusers(tiny_dir)


@pytest.fixture()
def tiny_request():  # type: ignore[no-untyped-def]
    from fastlora_core.specs import GenerateRequest

    return GenerateRequest(prompt="a red fox", seed=7, steps=2, width=64, height=64, max_sequence_length=16)


@pytest.fixture(autouse=True)
def _release_engines():  # type: ignore[no-untyped-def]
    yield
    from fastlora_core import registry

    registry.release_all()


@pytest.fixture(autouse=True)
def _forget_optional_imports():  # type: ignore[no-untyped-def]
    """Tests that hide torchao/bitsandbytes/triton must not leave their answer in deps.usable's cache."""
    yield
    from fastlora_core import deps

    deps.usable.cache_clear()
