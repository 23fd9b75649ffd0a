"""The transformers scorer: CodeScaler's exact input format, truncation, and the choice of runner.

Inputs follow the authors' recipe: a user turn with the problem and an assistant
turn with the code, rendered by the model's own chat template, tokenized without
extra special tokens; the score is the classifier logit at the last real token.
Instead of the authors' right truncation (which cuts the code the score is read
at), overlong inputs lose tokens from the middle of the problem.

Batches run through one of two runners: packed (no padding, shared prefixes
cached across batches; CPU with sdpa, or flash_attention_2; models/varlen.py)
or padded (any attention implementation; models/padded.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models import tiny, varlen
from models.base import EncodedItem, ModelLoadError, OutOfMemory, Scorer, TooLong
from models.padded import PaddedRunner
from models.template import ChatLayout
from models.varlen import PackedRunner

log = logging.getLogger(__name__)

EXPECTED_PAD_TOKEN_ID = tiny.PAD_TOKEN_ID
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Tokens per packed forward on a CPU. Matrix products are as efficient at a few thousand
#: rows as at tens of thousands there (measured: loadtests/bench.py's model, 2 cores), and
#: smaller chunks keep activations small (16384 tokens of the 25M model: ~100 MB a tensor).
CPU_CHUNK_TOKENS = 4096


def _resolve_device(device: str) -> torch.device:
    """'auto' means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA (the checkpoints' dtype) and fp32 on CPU (exactness, speed)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _resolve_attention(attn: str, device: torch.device) -> str:
    """'auto' takes flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    if attn != "auto":
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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


class HFScorer(Scorer):
    """A ``*ForSequenceClassification`` reward model on one device."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "auto",
        max_length: int = 4096,
        cache_dir: Path | None = None,
        prefix_reuse: bool = True,
        max_batch_tokens: int = 16384,
        max_batch_items: int = 64,
        max_padding: float = 0.05,
        prefix_cache_tokens: int = 16384,
        packed: bool | None = None,
    ) -> None:
        """Load ``model``; ``packed`` None picks the packed runner where it applies (see models/varlen.py).

        ``prefix_cache_tokens`` bounds the problem states kept between batches (0 = none);
        ``max_padding`` applies to the padded runner only.
        """
        self.name = model
        self.revision = revision
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_padding = max_padding
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.attn_implementation = _resolve_attention(attn_implementation, self.device)
        path = resolve_model_path(model, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, revision=revision, trust_remote_code=False, use_safetensors=True,
                dtype=self.dtype, attn_implementation=self.attn_implementation,
            )
        except (OSError, ValueError, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"model {model!r}: {reason}") from exc
        self.model.to(self.device).eval()
        if self.tokenizer.chat_template is None:
            raise ModelLoadError(f"model {model!r}: the tokenizer has no chat template")
        self.pad_token_id = self._check_pad_token()
        self.im_start_id = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        try:  # contents go into the template as text: they cannot forge its control tokens
            self.layout = ChatLayout(self.tokenizer)
        except ValueError as exc:
            raise ModelLoadError(f"model {model!r}: {exc}") from exc
        self.runner: PackedRunner | PaddedRunner
        if packed is not False and varlen.supported(self.model, self.device, self.attn_implementation):
            varlen.install(self.model, self.attn_implementation)
            chunk = max_batch_tokens if self.device.type != "cpu" else min(max_batch_tokens, CPU_CHUNK_TOKENS)
            self.runner = PackedRunner(self.model, self.device, max_tokens=chunk,
                                       prefix_reuse=prefix_reuse, cache_tokens=prefix_cache_tokens)
        elif packed:
            raise ModelLoadError(f"model {model!r}: packed scoring needs sdpa on CPU or flash_attention_2")
        else:
            self.runner = PaddedRunner(self.model, self.device, self.pad_token_id, max_tokens=max_batch_tokens,
                                       max_items=max_batch_items, max_padding=max_padding,
                                       prefix_reuse=prefix_reuse)
        self.template_hash = hashlib.sha256(self.tokenizer.chat_template.encode()).hexdigest()[:16]

    def _check_pad_token(self) -> int:
        """Every CodeScaler checkpoint pads with <|endoftext|>; fill it in when the config lacks it."""
        config_pad = self.model.config.pad_token_id
        tokenizer_pad = self.tokenizer.pad_token_id
        if config_pad is None:
            if tokenizer_pad is None:
                raise ModelLoadError(f"model {self.name!r}: neither config nor tokenizer has a pad token")
            self.model.config.pad_token_id = config_pad = tokenizer_pad
        if config_pad != EXPECTED_PAD_TOKEN_ID:
            log.warning("pad_token_id is %s, CodeScaler models use %s", config_pad, EXPECTED_PAD_TOKEN_ID)
        return int(config_pad)

    # ------------------------------------------------------------------ encode
    def render(self, problem: str, code: str) -> str:
        """The exact text the model reads: the model's own template, user then assistant, no system."""
        chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": code}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)

    def encode(self, problem: str, code: str) -> EncodedItem:
        """Token ids of (problem, code), shortened in the middle of the problem when too long (models/template.py)."""
        encoded = self.layout.encode(problem, code, self.max_length)
        return EncodedItem(tuple(encoded.ids), self._prefix_len(encoded.ids), encoded.truncated, encoded.forged)

    def _prefix_len(self, ids: Sequence[int]) -> int:
        """Tokens up to the start of the last turn: they depend on the problem only."""
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == self.im_start_id:
                return i + 1
        return 0

    # ------------------------------------------------------------------- score
    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        """Raw logits in input order; a problem shared by several items runs once when prefix reuse is on."""
        try:
            with torch.inference_mode():
                scores, stats = self.runner.run(items)
        except torch.OutOfMemoryError as exc:
            self.clear_prefix_cache()  # cached prefixes hold device memory; the retry needs it
            raise OutOfMemory(f"out of memory scoring {len(items)} items") from exc
        self.last_stats = stats
        return scores

    @property
    def prefix_reuse(self) -> bool:
        """Whether shared problems run once (the switch that turns it off for comparison)."""
        return self.runner.prefix_reuse

    @prefix_reuse.setter
    def prefix_reuse(self, on: bool) -> None:
        self.runner.prefix_reuse = on

    def clear_prefix_cache(self) -> None:
        """Forget the problems kept for reuse across batches (packed runner only)."""
        if isinstance(self.runner, PackedRunner):
            self.runner.cache.clear()

    # ------------------------------------------------------------------ other
    def warmup(self) -> None:
        """Score two items sharing a problem so both code paths are initialised."""
        items = [self.encode("Warm up.", "print(1)"), self.encode("Warm up.", "print(2)")]
        self.score(items)
        self.clear_prefix_cache()

    def info(self) -> dict[str, Any]:
        """What /v1/models reports."""
        return {
            "id": self.name, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device), "max_length": self.max_length,
            "attn_implementation": self.attn_implementation, "chat_template_sha256": self.template_hash,
            "prefix_reuse": self.prefix_reuse,
            "runner": "packed" if isinstance(self.runner, PackedRunner) else "padded",
        }

