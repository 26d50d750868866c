"""Configuration enters here once (flags and ADAPTER_SERVER_* variables) and leaves as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
MergePolicy = Literal["auto", "never"]
Graphs = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2"
    device: Device = "auto"
    dtype: DType = "auto"
    cache_dir: Path = Path(".cache/models")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_model_len: int = 2048
    max_new_tokens_limit: int = 1024
    prefill_token_budget: int = 4096
    kv_cache_tokens: int = 65536
    merge_policy: MergePolicy = "auto"
    merge_after_steps: int = 4
    max_queue: int = 256
    request_timeout_s: float = 600.0
    cuda_graphs: Graphs = "auto"
    compile_kernels: bool = True  # CUDA graphs only: fuse the decode step's elementwise chains
    device_slots: int = 16  # adapters resident on the device at once


@dataclass(frozen=True)
class RegistryConfig:
    store_dir: Path = Path("adapters_store")
    host_capacity: int = 64
    max_upload_bytes: int = 256 * 1024 * 1024


class Settings(BaseSettings):
    """Every flag of `adapter-server serve`; each also reads ADAPTER_SERVER_<FLAG>."""

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SERVER_", extra="ignore")

    model: str = "smollm2"
    store: Path = Path("adapters_store")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Device = "auto"
    dtype: DType = "auto"
    cache_dir: Path = Path(".cache/models")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_model_len: int = Field(2048, ge=16)
    max_new_tokens_limit: int = Field(1024, ge=1)
    prefill_token_budget: int = Field(4096, ge=16)
    kv_cache_tokens: int = Field(65536, ge=64)
    merge_policy: MergePolicy = "auto"
    device_slots: int = Field(16, ge=1, le=4096)
    host_capacity: int = Field(64, ge=1)
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    cuda_graphs: Graphs = "auto"
    compile_kernels: bool = True
    api_key: str | None = None
    admin_api_key: str | None = None
    log_level: str = "info"

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return v

    def model_cfg(self) -> ModelConfig:
        return ModelConfig(self.model, self.device, self.dtype, self.cache_dir)

    def engine_cfg(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_model_len=self.max_model_len,
            max_new_tokens_limit=self.max_new_tokens_limit,
            prefill_token_budget=self.prefill_token_budget,
            kv_cache_tokens=self.kv_cache_tokens,
            merge_policy=self.merge_policy,
            max_queue=self.max_queue,
            request_timeout_s=self.request_timeout_s,
            cuda_graphs=self.cuda_graphs,
            compile_kernels=self.compile_kernels,
            device_slots=self.device_slots,
        )

    def registry_cfg(self) -> RegistryConfig:
        return RegistryConfig(self.store, self.host_capacity, self.max_upload_bytes)
