"""The one configuration object of the service: parsed once, passed down.

Precedence is CLI flag > environment variable ``CODESCALER_<FIELD>`` > default.
Every field documents its meaning and valid range; nothing else in the code
reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ExtractionPolicy = Literal["paper", "lenient", "none"]
ShapingPolicy = Literal["softplus", "none"]


class Settings(BaseSettings):
    """Every knob of CodeScaler Serve. Field names map to ``--kebab-case`` flags."""

    model_config = SettingsConfigDict(
        env_prefix="CODESCALER_", extra="forbid", protected_namespaces=()
    )

    # --- model -----------------------------------------------------------
    model: str = Field(
        "LARK-Lab/CodeScaler-8B",
        description="Hub id or local directory of the reward model; 'tiny-random' "
        "builds a tiny random Qwen3 reward model (meaningless scores, for trying and testing).",
    )
    revision: str | None = Field(None, description="Pinned hub revision (commit, tag or branch).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention of ordinary (padded) forwards; auto = sdpa. Packed forwards "
        "use --attention-kernel.",
    )
    attention_kernel: Literal["auto", "torch_varlen", "cpu_fused", "reference"] = Field(
        "auto", description="Kernel of packed attention: auto = torch_varlen (torch's varlen_attn, FA3 "
        "where flash_attn_interface is installed on sm90) on CUDA in bf16/fp16, reference on CUDA in "
        "float32 (FlashAttention has none), cpu_fused on CPU; reference = plain float32 matrix products.",
    )
    max_length: int = Field(
        4096, ge=64, le=131072, description="Token limit of one (problem, code) input."
    )
    model_cache_dir: Path | None = Field(
        None, description="Where 'tiny-random' is built; default ~/.cache/codescaler-serve."
    )
    prefix_reuse: bool = Field(
        True,
        description="Run a problem shared by several items of a batch once and reuse its "
        "key/value cache; off only for comparison.",
    )
    prefix_cache_bytes: int | None = Field(
        None, ge=0, description="Bytes of problem key/values kept between batches (0 = none); "
        "default: half the device memory free after warm-up (CPU: a tenth of available memory, <= 4 GiB).",
    )
    chunk_tokens: int | None = Field(
        None, ge=64, description="Tokens of one packed forward at most; default max_batch_tokens "
        "(CPU: at most 2048, where activations stay in the CPU's caches; faster per token).",
    )
    max_padding: float = Field(
        0.05, ge=0, le=1, description="Padded runner only: share of padding a chunk may have (0..1).",
    )
    result_cache_items: int = Field(
        16384, ge=0, le=10_000_000, description="Recent results kept by input digest, so identical "
        "inputs run once (0 = off).",
    )

    # --- request defaults -----------------------------------------------
    extraction: ExtractionPolicy = Field("paper", description="Default extraction policy.")
    shaping: ShapingPolicy = Field("softplus", description="Default reward shaping.")
    invalid_reward: float = Field(
        0.0, description="Reward of an invalid item under shaping 'none' (softplus always uses 0)."
    )
    language: str = Field("python", description="Language of untagged code blocks.")

    # --- server ------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port (0 = any free port).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    # --- batching ----------------------------------------------------------
    max_batch_tokens: int = Field(
        16384, ge=64, description="Token budget of one forward, padding counted."
    )
    max_batch_items: int = Field(64, ge=1, le=4096, description="Items in one forward at most.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a batch waits to fill after its first item."
    )
    max_queue_items: int = Field(
        8192, ge=1, description="Queued items before new requests get 503 + Retry-After."
    )
    preprocess_workers: int = Field(
        2, ge=1, le=64, description="Threads for extraction and tokenization."
    )

    # --- limits --------------------------------------------------------------
    max_items_per_request: int = Field(4096, ge=1, description="More items -> 413.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Larger body -> 413.")
    max_chars_per_field: int = Field(
        400_000, ge=1, description="Characters of one problem or response before tokenizing -> 413."
    )
    request_timeout: float = Field(
        300.0, gt=0, description="Seconds an item may wait in the queue before its request gets 504."
    )
    forward_timeout: float = Field(
        120.0, gt=0, description="A forward slower than this turns /ready to 503 until it ends."
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="After SIGTERM, seconds that scoring requests are still accepted."
    )

    # --- admission (issue 12)
    max_queue_tokens: int = Field(
        8_388_608, ge=64, description="Tokens admitted at once (being prepared, queued or in a forward), "
        "estimated from characters until tokenized; more -> 503 + Retry-After."
    )
    body_read_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds a request's whole body may take to arrive before 408."
    )
    max_active_requests: int = Field(
        1024, ge=1, description="Requests being read or answered at once (idle keep-alive connections "
        "do not count); more -> 503 + Retry-After. /health and /ready are never refused."
    )

    # --- security -----------------------------------------------------------
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted bearer keys (repeatable); none = open."
    )
    api_key_file: Path | None = Field(None, description="File with one accepted key per line.")
    metrics_public: bool = Field(False, description="Serve /metrics without a key.")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Allowed CORS origins.")

    # --- Ray Serve --------------------------------------------------------------
    ray_min_replicas: int = Field(1, ge=0, description="Ray Serve: fewest replicas.")
    ray_max_replicas: int = Field(1, ge=1, description="Ray Serve: most replicas.")
    ray_target_ongoing_requests: float = Field(
        64.0, gt=0, description="Ray Serve: ongoing requests per replica the autoscaler aims at."
    )
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; default 1 when the cluster has GPUs, else 0."
    )

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Environment variables carry lists as comma-separated strings."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _batch_can_hold_an_item(self) -> Settings:
        """A maximum-length item that no batch can hold would wait forever: refuse it at start."""
        if self.max_batch_tokens < self.max_length:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_length "
                f"({self.max_length}), or a maximum-length item could never be scored"
            )
        if self.max_queue_items < self.max_items_per_request:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least max_items_per_request "
                f"({self.max_items_per_request}), or a maximum-size request would get 503 forever"
            )
        if self.max_queue_tokens < self.max_length:
            raise ValueError(f"max_queue_tokens ({self.max_queue_tokens}) must be at least max_length "
                             f"({self.max_length}), or a maximum-length item could never be admitted")
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("ray_min_replicas must not exceed ray_max_replicas")
        return self

    def api_keys(self) -> list[str]:
        """All accepted keys: the repeatable flag plus the lines of the key file."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            keys.extend(line.strip() for line in lines if line.strip())
        return keys
