"""Shared fixtures: an offline Hugging Face environment and the tiny model, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub is reachable in tests; fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fault_scorer():  # type: ignore[no-untyped-def]
    """A FaultScorer whose gate is opened at the end, so no model thread outlives its test."""
    from tests.fault_scorers import FaultScorer

    scorer = FaultScorer()
    yield scorer
    scorer.gate.set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked gpu on machines without CUDA (they never gate CI)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the tiny-random model, built once for the whole test run."""
    from models.tiny import build_tiny

    cache = tmp_path_factory.mktemp("model-cache")
    build_tiny(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    """The tiny-random model directory (real Qwen3 tokenizer and template, random weights)."""
    return model_cache / "tiny-random"


@pytest.fixture(scope="session")
def tiny_scorer(model_cache: Path):  # type: ignore[no-untyped-def]
    """One HFScorer over the tiny model, fp32 on the CPU, shared by the model-tier tests."""
    from models.hf import HFScorer

    return HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def live_server(model_cache: Path):  # type: ignore[no-untyped-def]
    """A real codescaler-serve process with the tiny model on loopback, shared by the session."""
    from tests.helpers import start_server, stop_server

    proc, url = start_server(["--model", "tiny-random"], model_cache)
    yield url
    stop_server(proc)
