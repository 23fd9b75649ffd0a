"""Loading a reward model: where it comes from, which device and dtype, straight onto that device.

Kept apart from models/hf.py (which serves the model) so that each reads in one sitting.
Weights are loaded with ``device_map`` onto the target device: a GPU process never
holds a second copy of the model in host memory. The classifier head is kept in
float32 whatever the model's dtype: near a score of 3 bfloat16 resolves only about
0.016, so best-of-N candidates would tie and be ranked by their index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models import tiny
from models.base import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA (the checkpoints' dtype) and fp32 on CPU (exactness, speed)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def resolve_attention(attn: str) -> str:
    """'auto' is sdpa: the base of ordinary forwards (packed forwards use their own kernel)."""
    return "sdpa" if attn == "auto" else attn


def resolve_model_path(model: str, cache_dir: Path | None) -> str:
    """A local directory (checked for safetensors), 'tiny-random' (built), or a hub id."""
    if model == tiny.TINY_NAME:
        return str(tiny.build_tiny(cache_dir))
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if not looks_local:
        return model
    if not path.is_dir():
        raise ModelLoadError(f"model {model!r}: no such directory")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise ModelLoadError(
                f"model {model!r}: only pickle weights (*.bin/*.pt) found; safetensors required "
                "(pickle checkpoints can run arbitrary code when loaded)"
            )
        raise ModelLoadError(f"model {model!r}: no *.safetensors weights in the directory")
    return str(path)


def load(model: str, path: str, *, revision: str | None, dtype: torch.dtype, device: torch.device,
         attn_implementation: str) -> tuple[Any, Any]:
    """Tokenizer and eval-mode model on ``device``, head in float32; ModelLoadError with one line on failure."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        network = AutoModelForSequenceClassification.from_pretrained(
            path, revision=revision, trust_remote_code=False, use_safetensors=True, dtype=dtype,
            attn_implementation=attn_implementation, device_map=str(device),
        )
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {model!r}: {reason}") from exc
    float_head(network)
    return tokenizer, network


def float_head(network: Any) -> None:
    """Eval mode, classifier head in float32 (the scores' resolution), whatever the body's dtype."""
    network.eval()
    head = getattr(network, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ModelLoadError("the model is not a sequence classifier with a 'score' head")
    head.to(torch.float32)
