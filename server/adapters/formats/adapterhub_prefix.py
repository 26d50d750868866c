"""AdapterHub prefix tuning (docs/adapters.md §6.3): the saved prefix MLP (or flat tensor) evaluated once
at load into every layer's keys and values. Unlike PEFT, real positions are not shifted by the prefix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ...errors import InvalidAdapterError, UnsupportedAdapterError
from ..methods.prefix import PrefixWeights
from ..spec import AdapterWeights, BaseModelInfo
from .tensors import expect_shape, load_tensors, pick_weight_file

# one copy per decoder layer, and one more on the model: identical, checked, one used
KEY = re.compile(r"^(?:model\.layers\.(\d+)\.self_attn\.prefix_tuning\.pool|model\.prefix_tuning)"
                 r"\.prefix_tunings\.([^.]+)\.self_prefix\.(.+)$")
MLP = ("wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight", "control_trans.2.bias")


def parse_prefix(meta: dict[str, Any], files: dict[str, Path], base: BaseModelInfo, weight_files: tuple[str, ...]) -> AdapterWeights:
    c = meta["config"]
    if c.get("use_gating"):
        raise UnsupportedAdapterError("gated prefix tuning (use_gating) is not served", key="config.use_gating")
    if c.get("leave_out"):
        raise UnsupportedAdapterError("prefix tuning with leave_out is not served: every layer of a row sees its "
                                      "prefix here", key="config.leave_out")
    if base.head_dim * base.num_attention_heads != base.hidden_size:
        raise UnsupportedAdapterError("AdapterHub prefix tuning needs head_dim == hidden_size / num_attention_heads "
                                      "(the library itself fails otherwise)", key="config.architecture")
    P = c.get("prefix_length")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise InvalidAdapterError("prefix_length must be a positive integer", key="config.prefix_length")
    act = str(c.get("non_linearity", "tanh")).lower()
    if act not in ACT2FN:
        raise InvalidAdapterError(f"unknown non_linearity {act!r}", key="config.non_linearity")
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_tensors(pick_weight_file(files, weight_files)).items():
        m = KEY.match(key)
        if m is None or m.group(2) != meta.get("name", m.group(2)):
            raise InvalidAdapterError("not a prefix-tuning tensor of this adapter", key=key)
        copies.setdefault(m.group(1) or "model", {})[m.group(3)] = t.float()
    if not copies:
        raise InvalidAdapterError("weight file holds no tensors", key=weight_files[-1])
    first_name, first = next(iter(copies.items()))
    for name, parts in copies.items():
        if parts.keys() != first.keys() or any(not torch.equal(parts[k], first[k]) for k in parts):
            raise InvalidAdapterError(f"the prefix copies of {first_name!r} and {name!r} differ", key="pytorch_adapter.bin")
    L, kvh, d, H = base.num_layers, base.num_kv_heads, base.head_dim, base.hidden_size
    width = L * 2 * kvh * d
    if c.get("flat", False):
        if set(first) != {"control_trans"}:
            raise InvalidAdapterError("a flat prefix holds one tensor, control_trans", key=sorted(first)[0])
        expect_shape("control_trans", first["control_trans"], (P * width,))
        kv = first["control_trans"].view(P, width)
    else:
        missing = [k for k in MLP if k not in first]
        if missing or len(first) != len(MLP):
            raise InvalidAdapterError("the prefix MLP needs wte and control_trans.0/.2 weights and biases",
                                      key=(missing or sorted(set(first) - set(MLP)))[0])
        bneck = first["control_trans.0.weight"].shape[0]
        for k, shape in zip(MLP, ((P, H), (bneck, H), (bneck,), (width, bneck), (width,)), strict=True):
            expect_shape(k, first[k], shape)
        hidden = ACT2FN[act](F.linear(first["wte.weight"], first["control_trans.0.weight"], first["control_trans.0.bias"]))
        kv = F.linear(hidden, first["control_trans.2.weight"], first["control_trans.2.bias"])  # [P, width]
    kv = kv.reshape(P, L * 2, kvh, d).permute(1, 2, 0, 3)  # [2L, kvh, P, d]: layer l's keys at 2l, values at 2l + 1
    return AdapterWeights(method="prefix", format="adapterhub", variant="prefix_tuning",
                          payload=PrefixWeights(kv[0::2].contiguous(), kv[1::2].contiguous(), rope_shift=-P), config=meta)
