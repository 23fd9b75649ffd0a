"""The transformers scorer: CodeScaler's exact input format, truncation, and the choice of runner.

Inputs follow the authors' recipe: a user turn with the problem and an assistant
turn with the code, rendered by the model's own chat template, tokenized without
extra special tokens; the score is the classifier logit at the last real token.
Instead of the authors' right truncation (which cuts the code the score is read
at), overlong inputs lose tokens from the middle of the problem.

Batches run through one of two runners: packed (no padding, shared prefixes run once
and cached across batches, on CPU and CUDA alike; models/varlen.py) or padded (models
whose layers the packed path cannot serve, e.g. sliding windows; models/padded.py).
Out of memory, whichever way it is raised, frees the failed forward and becomes
OutOfMemory, so the batcher can retry in halves while the service stays ready.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models import attention, memory, tiny, varlen
from models.base import BatchStats, EncodedItem, ModelLoadError, OutOfMemory, Scorer
from models.cost import BatchCost
from models.loading import float_head, load, resolve_attention, resolve_device, resolve_dtype, resolve_model_path
from models.padded import PaddedRunner
from models.template import ChatLayout
from models.varlen import PackedRunner

__all__ = ["HFScorer", "resolve_model_path"]

log = logging.getLogger(__name__)

EXPECTED_PAD_TOKEN_ID = tiny.PAD_TOKEN_ID
#: Tokens per packed forward on a CPU when the settings leave it open. Matrix products are as
#: efficient at 2,048 rows as at more, while the norms, activations and residual adds only stay
#: in the CPU's caches in small forwards. The recorded benchmark (loadtests/results/bench.json)
#: ran with this value; compare another with ``loadtests/bench.py --service-arg=--chunk-tokens=N``.
CPU_CHUNK_TOKENS = 2048
#: Rollouts per problem in the warm-up batch (a GRPO group).
WARMUP_GROUP = 8


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
        prefix_cache_bytes: int | None = None,
        chunk_tokens: int | None = None,
        kernel: str = "auto",
        packed: bool | None = None,
        loaded: tuple[Any, Any] | None = None,
    ) -> None:
        """Load ``model`` onto its device; ``packed`` None picks the packed runner where it applies.

        ``prefix_cache_bytes`` bounds the problem states kept between batches (0 = none,
        None = half the device memory free after warm-up; see models/memory.py);
        ``chunk_tokens`` caps one packed forward (None: ``max_batch_tokens``, at most
        2048 on a CPU); ``kernel`` names the packed attention kernel (models/attention.py:
        auto, torch_varlen, cpu_fused, reference); ``max_padding`` applies to the padded runner.
        ``loaded`` (tokenizer, model) serves a model built in memory (loadtests/gpu_check.py).
        """
        self.name = model
        self.revision = revision
        self.max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.attn_implementation = resolve_attention(attn_implementation)
        if loaded is None:
            loaded = load(model, resolve_model_path(model, cache_dir), revision=revision, dtype=self.dtype,
                          device=self.device, attn_implementation=self.attn_implementation)
        else:
            float_head(loaded[1])
        self.tokenizer, self.model = loaded
        if self.tokenizer.chat_template is None:
            raise ModelLoadError(f"model {model!r}: the tokenizer has no chat template")
        self.pad_token_id = self._check_pad_token()
        self.im_start_id = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        try:  # contents go into the template as text: they cannot forge its control tokens
            self.layout = ChatLayout(self.tokenizer)
        except ValueError as exc:
            raise ModelLoadError(f"model {model!r}: {exc}") from exc
        self.cache_bytes_auto = prefix_cache_bytes is None
        self.kernel_name: str | None = None
        self.fa3 = False
        self.runner: PackedRunner | PaddedRunner
        if packed is not False and varlen.supported(self.model):
            self.kernel_name, self.fa3 = attention.select(kernel, self.device, self.dtype)
            varlen.install(self.model)
            if chunk_tokens is None:
                chunk_tokens = max_batch_tokens if self.device.type != "cpu" else min(max_batch_tokens, CPU_CHUNK_TOKENS)
            self.runner = PackedRunner(self.model, self.device, attention.KERNELS[self.kernel_name],
                                       chunk_tokens=chunk_tokens, prefix_reuse=prefix_reuse,
                                       cache_bytes=prefix_cache_bytes if prefix_cache_bytes is not None
                                       else memory.default_cache_bytes(self.device))  # re-measured when warm
        elif packed:
            raise ModelLoadError(f"model {model!r}: packed scoring needs full attention in every layer")
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
        return self.score_with_stats(items)[0]

    def score_with_stats(self, items: Sequence[EncodedItem]) -> tuple[list[float], BatchStats | None]:
        """Raw logits and the work done; any allocation failure becomes OutOfMemory after freeing.

        The failed forward's tensors are referenced by the exception's traceback, so the
        memory is given back and OutOfMemory raised only once the handler has ended.
        """
        try:
            with torch.inference_mode():
                return self.runner.run(items)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not memory.is_allocation_failure(exc):
                raise
            log.warning("out of memory scoring %d items (%d tokens): %s", len(items),
                        sum(i.length for i in items), str(exc).splitlines()[0][:200])
        self.clear_prefix_cache()  # cached prefixes hold device memory; the retry needs it
        memory.release(self.device)
        raise OutOfMemory(f"out of memory scoring {len(items)} items")

    def batch_cost(self) -> BatchCost:
        """What a batch costs the runner: packed, prefixes once; padded, items x longest."""
        return self.runner.batch_cost()

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
        """Check the attention kernel, run the largest batch twice, then size the prefix cache.

        The kernel check makes a kernel whose layouts changed refuse to start (one line)
        instead of serving wrong scores; FA3 that fails it is switched back to FA2, which is
        checked in its place (attention.verify). The largest batch (``max_batch_tokens`` of GRPO
        groups, ``max_batch_items`` at most) reserves the activation memory of a full
        forward; its second run reads the prefixes back from the cache. What is then free
        sizes the prefix cache when the settings leave it open.
        """
        if self.kernel_name is not None:
            try:
                self.fa3 = attention.verify(self.kernel_name, self.device, self.dtype, fa3=self.fa3)
            except attention.KernelMismatch as exc:
                raise ModelLoadError(f"attention kernel {self.kernel_name} on {self.device} breaks its "
                                     f"contract ({exc}); refusing to serve wrong scores") from None
        items = self.warmup_items()
        if isinstance(self.runner, PackedRunner) and self.cache_bytes_auto:
            self.runner.cache.max_bytes = self.runner.prefix_bytes(sum(i.length for i in items))
        self.score(items)
        self.score(items)
        self.clear_prefix_cache()
        if isinstance(self.runner, PackedRunner) and self.cache_bytes_auto:
            self.runner.cache.max_bytes = memory.default_cache_bytes(self.device)
        log.info("warm: %d items, %d tokens; prefix cache %.1f MiB", len(items), sum(i.length for i in items),
                 self.prefix_cache_bytes / 2**20)

    def warmup_items(self) -> list[EncodedItem]:
        """GRPO groups filling the batch budget by the runner's own cost (the largest batch shape)."""
        cost = self.batch_cost()
        problem_words = max(8, self.max_length // 3)
        code_lines = max(1, self.max_length // 40)
        items: list[EncodedItem] = []
        while len(items) < self.max_batch_items:
            problem = f"Warm-up problem {len(items) // WARMUP_GROUP}: " + " ".join(["numbers"] * problem_words)
            code = "\n".join(f"x{k} = {len(items)} + {k}" for k in range(code_lines))
            item = self.encode(problem, code)
            if items and cost.cost_with(item) > self.max_batch_tokens:
                break
            cost.add(item)
            items.append(item)
        return items

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the prefix cache may hold (0 for the padded runner, which keeps none)."""
        return self.runner.cache.max_bytes if isinstance(self.runner, PackedRunner) else 0

    def info(self) -> dict[str, Any]:
        """What /v1/models reports."""
        packed = isinstance(self.runner, PackedRunner)
        return {
            "id": self.name, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device), "max_length": self.max_length,
            "attn_implementation": self.attn_implementation, "chat_template_sha256": self.template_hash,
            "prefix_reuse": self.prefix_reuse, "runner": "packed" if packed else "padded",
            "attention_kernel": (self.kernel_name + ("+FA3" if self.fa3 else "")) if self.kernel_name else None,
            "prefix_cache_bytes": self.prefix_cache_bytes,
        }
