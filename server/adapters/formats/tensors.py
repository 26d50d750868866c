"""Reading untrusted tensor files: safetensors, or a torch pickle with weights_only=True. Never a full unpickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import InvalidAdapterError


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, as float32 on the host; typed error on anything malformed."""
    name = path.name
    try:
        if name.endswith(".safetensors"):
            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise InvalidAdapterError(f"cannot read weight file {name}: {e}", key=name) from e
    except Exception as e:  # weights_only refuses anything but tensors: UnpicklingError and friends
        raise InvalidAdapterError(f"weight file {name} is not a plain tensor file: {e}", key=name) from e
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InvalidAdapterError(f"weight file {name} must hold a flat dict of tensors", key=name)
    out: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if not (t.is_floating_point()):
            raise InvalidAdapterError(f"tensor has dtype {t.dtype}, expected floating point", key=key)
        t = t.detach().to(torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise InvalidAdapterError("tensor holds NaN or Inf", key=key)
        out[str(key)] = t
    return out


def pick_weight_file(files: dict[str, Path], candidates: tuple[str, ...]) -> Path:
    """The first weight file present, preferring safetensors; typed error when none is."""
    for c in candidates:
        if c in files:
            return files[c]
    raise InvalidAdapterError(f"missing weight file: expected one of {', '.join(candidates)}", key=candidates[0])


def expect_shape(key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise InvalidAdapterError(f"shape {tuple(t.shape)} does not fit the base model, expected {shape}", key=key)
