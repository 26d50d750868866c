"""The decode step's fused functions compute exactly what the HF modules compute (checked eagerly here;
the CUDA tests run them compiled inside captured graphs against the CPU engine)."""

from __future__ import annotations

import importlib

import torch

from server.engine.fused import FusedOps, add_rms_norm, rms_norm, rope, silu_mul
from tests.helpers import tiny_model


def test_fused_functions_equal_the_modules_bit_for_bit():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    layer = model.model.layers[0]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 1, model.config.hidden_size, generator=g).to(dtype)
        norm = layer.input_layernorm.to(dtype)
        assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
        a = torch.randn(3, 1, model.config.hidden_size, generator=g).to(dtype)
        s, n = add_rms_norm(x, a, norm.weight, norm.variance_epsilon)
        assert torch.equal(s, x + a) and torch.equal(n, norm(x + a))
        q = torch.randn(3, 4, 1, 16, generator=g).to(dtype)
        k = torch.randn(3, 2, 1, 16, generator=g).to(dtype)
        cos, sin = torch.randn(3, 1, 16, generator=g).to(dtype), torch.randn(3, 1, 16, generator=g).to(dtype)
        ref = importlib.import_module(type(model).__module__).apply_rotary_pos_emb(q, k, cos, sin)
        for a, b in zip(rope(q, k, cos, sin), ref, strict=True):
            assert torch.equal(a, b)
        gate, up = torch.randn(3, 1, 8, generator=g).to(dtype), torch.randn(3, 1, 8, generator=g).to(dtype)
        assert torch.equal(silu_mul(gate, up), layer.mlp.act_fn(gate) * up)
    model = model.float()
    assert FusedOps(model.config, model.model).enabled
