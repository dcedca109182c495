"""Server settings, read from the environment (MOME_*) and the `mome serve` flags."""

from __future__ import annotations

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    enforce_eager: bool = True
    default_max_tokens: int = 256
    # Admin API bearer key; empty is refused unless `dev_mode` is on.
    admin_key: str = ""
    dev_mode: bool = False

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be at least 16")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        return self

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"
