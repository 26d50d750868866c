"""Configuration enters here once (flags and ADAPTER_SERVER_* variables) and leaves as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8", "int4"]
MergePolicy = Literal["auto", "never"]
Graphs = Literal["auto", "on", "off"]
Switch = Literal["on", "off"]


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2"
    device: Device = "auto"
    dtype: DType = "auto"
    cache_dir: Path = Path(".cache/models")
    quantization: Quantization = "none"


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_model_len: int = 2048
    max_new_tokens_limit: int = 1024
    prefill_token_budget: int = 4096
    kv_cache_tokens: int = 65536  # positions of the KV cache's page pool
    kv_page_size: int = 16  # positions per page
    prefix_caching: Switch = "on"  # full pages of prompts kept and reused, per adapter version
    merge_policy: MergePolicy = "auto"
    merge_after_steps: int = 4
    max_queue: int = 256
    request_timeout_s: float = 600.0
    cuda_graphs: Graphs = "auto"
    compile_kernels: bool = True  # pack sibling projections; on the CPU, native kernels (paged decode, LoRA and bottleneck rows, small bf16 products); with CUDA graphs, fuse the decode step's elementwise chains
    device_slots: int = 16  # adapters resident on the device at once
    # device bytes they may hold together: None ("auto"), half the GPU memory free once the model is in place,
    # less the KV cache still to grow (no limit on the CPU); 0, no limit but the slot count
    adapter_device_bytes: int | None = None


@dataclass(frozen=True)
class RegistryConfig:
    host_capacity: int = 64  # parsed adapters kept in host memory
    host_bytes: int = 0  # host bytes they may hold together (0: no limit but the count)


_M, _E, _R = ModelConfig, EngineConfig, RegistryConfig  # the one source of every default below


class Settings(BaseSettings):
    """Every flag of `adapter-server serve`; each also reads ADAPTER_SERVER_<FLAG>. Defaults come from
    the frozen configs above; Settings adds only the bounds and the flags of the HTTP edge."""

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SERVER_", extra="ignore")

    model: str = _M.model
    store: Path = Path("adapters_store")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Device = _M.device
    dtype: DType = _M.dtype
    quantization: Quantization = _M.quantization
    cache_dir: Path = _M.cache_dir
    max_batch_size: int = Field(_E.max_batch_size, ge=1, le=1024)
    max_model_len: int = Field(_E.max_model_len, ge=16)
    max_new_tokens_limit: int = Field(_E.max_new_tokens_limit, ge=1)
    prefill_token_budget: int = Field(_E.prefill_token_budget, ge=16)
    kv_cache_tokens: int = Field(_E.kv_cache_tokens, ge=64)
    kv_page_size: int = Field(_E.kv_page_size, ge=1, le=1024)
    prefix_caching: Switch = _E.prefix_caching
    merge_policy: MergePolicy = _E.merge_policy
    merge_after_steps: int = Field(_E.merge_after_steps, ge=1)
    device_slots: int = Field(_E.device_slots, ge=1, le=4096)
    adapter_device_bytes: int | None = Field(_E.adapter_device_bytes, ge=0)
    host_capacity: int = Field(_R.host_capacity, ge=1)
    adapter_host_bytes: int = Field(_R.host_bytes, ge=0)
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_queue: int = Field(_E.max_queue, ge=1)
    request_timeout_s: float = Field(_E.request_timeout_s, gt=0)
    cuda_graphs: Graphs = _E.cuda_graphs
    compile_kernels: bool = _E.compile_kernels
    api_key: str | None = None
    admin_api_key: str | None = None
    adapter_load_root: Path | None = None  # turns on POST /v1/load_lora_adapter for folders under it
    log_level: str = "info"

    @field_validator("adapter_device_bytes", mode="before")
    @classmethod
    def _auto(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() == "auto" else v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return v

    def model_cfg(self) -> ModelConfig:
        return ModelConfig(self.model, self.device, self.dtype, self.cache_dir, self.quantization)

    def engine_cfg(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})

    def registry_cfg(self) -> RegistryConfig:
        return RegistryConfig(self.host_capacity, self.adapter_host_bytes)
