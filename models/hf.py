"""The transformers runner: CodeScaler's exact input format, truncation, batching, prefix reuse.

Inputs follow the authors' recipe: a user turn with the problem and an assistant
turn with the code, rendered by the model's own chat template, tokenized without
extra special tokens; the score is the classifier logit at the last real token.
Instead of the authors' right truncation (which cuts the code the score is read
at), overlong inputs lose tokens from the middle of the problem.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models import tiny
from models.base import BatchStats, EncodedItem, ModelLoadError, OutOfMemory, Scorer, TooLong
from models.packing import pack_by_length

log = logging.getLogger(__name__)

EXPECTED_PAD_TOKEN_ID = tiny.PAD_TOKEN_ID
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    ) -> None:
        self.name = model
        self.revision = revision
        self.max_length = max_length
        self.prefix_reuse = prefix_reuse
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
        base = self.model.base_model
        params = inspect.signature(base.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either release line.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
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
        """Token ids of (problem, code), shortened in the middle of the problem when too long."""
        text = self.render(problem, code)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = encoding["input_ids"]
        truncated = False
        if len(ids) > self.max_length:
            ids = self._cut_problem_middle(text, problem, ids, encoding["offset_mapping"])
            truncated = True
        return EncodedItem(tuple(ids), self._prefix_len(ids), truncated)

    def _cut_problem_middle(self, text: str, problem: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[int]:
        """Drop tokens from the middle of the problem, keeping its start and end and all of the code."""
        start = text.find(problem) if problem else -1
        end = start + len(problem)
        inside = [i for i, (a, b) in enumerate(offsets) if start >= 0 and a >= start and b <= end]
        excess = len(ids) - self.max_length
        if len(inside) < excess:
            raise TooLong(f"the code needs more than max_length={self.max_length} tokens")
        keep = len(inside) - excess
        head = (keep + 1) // 2
        dropped = set(inside[head : head + excess])
        return [token for i, token in enumerate(ids) if i not in dropped]

    def _prefix_len(self, ids: Sequence[int]) -> int:
        """Tokens up to the start of the last turn: they depend on the problem only."""
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == self.im_start_id:
                return i + 1
        return 0

    # ------------------------------------------------------------------- score
    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        """Raw logits in input order; groups sharing a problem run it once when prefix reuse is on."""
        results: list[float | None] = [None] * len(items)
        self._work = [0, 0]
        try:
            with torch.inference_mode():
                singles: list[int] = []
                for group in self._groups(items):
                    if len(group) > 1:
                        self._score_shared(items, group, results)
                    else:
                        singles.extend(group)
                self._score_plain(items, singles, results)
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"out of memory scoring {len(items)} items") from exc
        assert all(r is not None for r in results)
        self.last_stats = BatchStats(tokens=self._work[0], padded_tokens=self._work[1])
        return [float(r) for r in results]  # type: ignore[arg-type]

    def _groups(self, items: Sequence[EncodedItem]) -> list[list[int]]:
        """Indices grouped by identical problem prefix; one group per item when reuse is off."""
        if not self.prefix_reuse:
            return [[i] for i in range(len(items))]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            key = item.input_ids[: item.prefix_len] if item.prefix_len else (id(item),)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _pad(self, rows: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, their attention mask and each row's last real position."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
        self._work[0] += sum(len(r) for r in rows)
        self._work[1] += ids.numel()
        return ids.to(self.device), mask.to(self.device), last.to(self.device)

    def _head(self, hidden: torch.Tensor, last: torch.Tensor) -> list[float]:
        """The classifier head on each row's last real token (what the HF forward pools)."""
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(pooled)[:, 0].float().tolist()

    def _score_plain(self, items: Sequence[EncodedItem], indices: list[int], results: list[float | None]) -> None:
        """Whole sequences, length-sorted into padded batches with little padding."""
        lengths = [items[i].length for i in indices]
        for chunk in pack_by_length(lengths, self.max_batch_tokens, self.max_batch_items, self.max_padding):
            rows = [items[indices[c]].input_ids for c in chunk]
            ids, mask, last = self._pad(rows)
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            for c, value in zip(chunk, self._head(hidden, last), strict=True):
                results[indices[c]] = value

    def _score_shared(self, items: Sequence[EncodedItem], group: list[int], results: list[float | None]) -> None:
        """The group's common prefix once, then its suffixes over copies of the prefix cache."""
        sequences = [items[i].input_ids for i in group]
        shared = _common_prefix_len(sequences)
        shared = min(shared, min(len(s) for s in sequences) - 1)  # every suffix keeps a token
        prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long, device=self.device)
        self._work[0] += shared
        self._work[1] += shared
        out = self.model.base_model(input_ids=prefix, use_cache=True)
        cache = getattr(out, self._cache_kwarg)
        suffix_lengths = [len(s) - shared for s in sequences]
        budget = max(self.max_batch_tokens - shared, 1)
        for chunk in pack_by_length(suffix_lengths, budget, self.max_batch_items, self.max_padding):
            rows = [sequences[c][shared:] for c in chunk]
            ids, mask, last = self._pad(rows)
            batch_cache = copy.deepcopy(cache)
            if len(chunk) > 1:
                batch_cache.batch_repeat_interleave(len(chunk))
            full_mask = torch.cat([torch.ones((len(chunk), shared), dtype=mask.dtype, device=self.device), mask], 1)
            positions = torch.arange(shared, shared + ids.shape[1], device=self.device).expand(len(chunk), -1)
            hidden = self.model.base_model(
                input_ids=ids, attention_mask=full_mask, position_ids=positions,
                use_cache=True, **{self._cache_kwarg: batch_cache},
            ).last_hidden_state
            for c, value in zip(chunk, self._head(hidden, last), strict=True):
                results[group[c]] = value

    # ------------------------------------------------------------------ other
    def warmup(self) -> None:
        """Score two items sharing a problem so both code paths are initialised."""
        items = [self.encode("Warm up.", "print(1)"), self.encode("Warm up.", "print(2)")]
        self.score(items)

    def info(self) -> dict[str, Any]:
        """What /v1/models reports."""
        return {
            "id": self.name, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device), "max_length": self.max_length,
            "attn_implementation": self.attn_implementation, "chat_template_sha256": self.template_hash,
            "prefix_reuse": self.prefix_reuse,
        }


def _common_prefix_len(sequences: list[Sequence[int]]) -> int:
    """Length of the longest prefix that all sequences share."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n
