"""Server settings, read from the environment (MOME_*) and the `mome serve` flags."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import MemoryConfig, TrainConfig

MIN_ADMIN_KEY_LEN = 8
# The memory and training defaults live in model/config.py, with the reasons for them.
_MEMORY, _TRAIN = MemoryConfig(), TrainConfig()


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOME_")

    model: str | None = None  # local HF checkpoint dir; None = the bundled default, pulled if missing
    served_model_name: str | None = None  # name clients pass as `model`; defaults to the dir name
    host: str = "127.0.0.1"
    port: int = 8000
    # Engine. float32 on CPU: vLLM's CPU bf16 kernels turn the 135M default into nonsense.
    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    # Prompt tokens per engine step (vLLM's default when unset); a longer prompt is split
    # into chunks over several steps (chunked prefill), which keeps decoding others going.
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    default_max_tokens: int = 256
    # Admin API bearer key. Unset: a random key is generated at start and written to
    # $MOME_HOME/admin_key (mode 0600), where `mome facts` finds it.
    admin_key: str = ""
    # Largest request body accepted (413 above it); a facts request holds at most 10,000 facts.
    max_request_bytes: int = 16 << 20
    # Memory experts.
    memory: bool = True  # False serves the plain backbone (no store, no admin API)
    store_dir: str | None = None  # default $MOME_HOME/stores/<model name>
    redis_url: str | None = None  # registry in Redis (several processes) instead of SQLite
    # How long a finished job's record is kept (GET /v1/jobs/{id}); its facts stay. 0: forever.
    job_retention_s: float = 7 * 24 * 3600.0
    memory_layer: int = _MEMORY.layer
    memory_d_k: int = _MEMORY.d_k
    memory_top_k: int = _MEMORY.top_k
    memory_gate: float = _MEMORY.gate
    memory_gate_separation: float = _MEMORY.gate_separation
    memory_index: Literal["auto", "flat", "ivf", "hnsw"] = _MEMORY.index  # see model/config.py
    memory_index_nprobe: int = Field(default=_MEMORY.index_nprobe, ge=1)
    # A new fact's second key (model/relation_key.py); 0 stores none, unset: the gate tuned
    # for the map of its kind in the store's router (model/config.py RELATION_GATES).
    memory_relation_gate_chat: float | None = Field(default=_MEMORY.relation_gate_chat, ge=0, lt=1)
    memory_relation_gate_completion: float | None = Field(
        default=_MEMORY.relation_gate_completion, ge=0, lt=1)
    # 64 queued CounterFact facts: 0.36 s/fact in batches of up to 32, 0.47 in batches of 8
    train_batch_size: int = 32
    train_margin: float = _TRAIN.margin
    train_view_margin: float = Field(default=_TRAIN.view_margin, ge=0)  # views: above this
    train_lr: float = Field(default=_TRAIN.lr, gt=0)
    train_adam_beta1: float = Field(default=_TRAIN.adam_beta1, ge=0, lt=1)
    train_adam_beta2: float = Field(default=_TRAIN.adam_beta2, ge=0, lt=1)
    train_context_views: int = _TRAIN.context_views
    train_history_views: int = _TRAIN.history_views  # chat facts: also asked after an exchange
    train_reworded_views: int = Field(default=_TRAIN.reworded_views, ge=0)  # in other words
    train_key_behind_prefixes: bool = _TRAIN.key_behind_prefixes
    train_views_after_facts: bool = _TRAIN.views_after_facts
    train_dtype: Literal["float32", "bfloat16"] = _TRAIN.dtype  # the training steps' layers above
    # CPU threads for memorization; 0 = all cores but one, left to the engine for serving.
    train_threads: int = 0
    # "inprocess": a worker thread memorizes; "external": `mome worker` processes do, and
    # this server follows the store versions they publish (needs redis_url).
    worker: str = "inprocess"
    provenance: bool = True

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be at least 16")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.job_retention_s != 0 and self.job_retention_s < 1:
            raise ValueError("job_retention_s must be 0 (keep forever) or at least 1 second")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        if not 0.0 < self.memory_gate <= 1.0:
            raise ValueError("memory_gate must be in (0, 1]: at or below 0 every expert fires")
        if not 0.0 <= self.memory_gate_separation < 1.0:
            raise ValueError("memory_gate_separation must be in [0, 1)")
        if (self.train_margin <= 0 or self.train_threads < 0
                or min(self.train_context_views, self.train_history_views) < 0):
            raise ValueError("train_margin must be positive, train_context_views, "
                             "train_history_views and train_threads >= 0")
        if self.worker not in ("inprocess", "external"):
            raise ValueError("worker must be 'inprocess' or 'external'")
        if self.worker == "external" and not self.redis_url:
            raise ValueError("an external worker is coordinated through Redis: set redis_url")
        if self.admin_key and len(self.admin_key) < MIN_ADMIN_KEY_LEN:
            raise ValueError(f"admin_key must be at least {MIN_ADMIN_KEY_LEN} characters")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        return self

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(layer=self.memory_layer, d_k=self.memory_d_k,
                            top_k=self.memory_top_k, gate=self.memory_gate,
                            gate_separation=self.memory_gate_separation,
                            index=self.memory_index, index_nprobe=self.memory_index_nprobe,
                            relation_gate_chat=self.memory_relation_gate_chat,
                            relation_gate_completion=self.memory_relation_gate_completion)

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.train_lr, adam_beta1=self.train_adam_beta1,
                           adam_beta2=self.train_adam_beta2, margin=self.train_margin,
                           view_margin=self.train_view_margin,
                           context_views=self.train_context_views,
                           history_views=self.train_history_views,
                           reworded_views=self.train_reworded_views,
                           key_behind_prefixes=self.train_key_behind_prefixes,
                           views_after_facts=self.train_views_after_facts,
                           dtype=self.train_dtype)

    def resolved_train_threads(self) -> int:
        return self.train_threads or max(1, (os.cpu_count() or 2) - 1)

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"
