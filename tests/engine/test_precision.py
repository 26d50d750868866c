"""A lighter base model: bfloat16 on the CPU and int8 / int4 weight-only quantization, adapters exact on top.

- bfloat16: PEFT's own bfloat16 forward (run here) and AdapterHub's (tests/fixtures/refs_bf16_adapterhub,
  written by the library in its own venv: make_fixtures.py adapterhub_bf16) on the same bfloat16 base.
- int8 / int4: PEFT wrapped around the very quantized base the engine serves (QuantLinear is an
  nn.Linear, so PEFT adapts it as it would any Linear): the QLoRA setting, compared exactly.
- the quantized kernels against the dequantized weights they hold, folding refused on quantized
  weights, and the loader's choices.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from server.config import ModelConfig
from server.engine.model_loader import load_base_model, native_bf16, resolve_dtype
from server.engine.quant import (
    QuantLinear,
    pack_nibbles,
    quantize_int4,
    quantize_model,
    unpack_int4,
    unpack_nibbles,
)
from server.errors import ModelLoadError
from tests.fixtures.make_fixtures import BF16_AH, MODEL_DIR
from tests.helpers import (
    FIXTURES,
    Collector,
    make_engine,
    our_logits,
    peft_logits,
    refs,
    req,
    run_until_done,
    tiny_model,
)

BF16 = torch.bfloat16
PEFT_BF16 = ["lora_qv", "lora_all_linear", "lora_bias", "dora_qv", "dora_rslora_all", "ia3_default", "ia3_ff_in",
             "prompt_tuning", "prefix_tuning"]


def logprobs(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.float(), -1)


def clear_argmax(ref: torch.Tensor, margin: float) -> torch.Tensor:
    """Positions whose top two logprobs differ by more than `margin`: not near-ties."""
    top2 = logprobs(ref).topk(2, -1).values
    return (top2[..., 0] - top2[..., 1]) > margin


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_model().to(BF16)


def one_bf16_step(ours: torch.Tensor, lib: torch.Tensor) -> bool:
    return (ours - lib).abs().max().item() <= 2**-7 * lib.abs().max().item()


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("name", PEFT_BF16)
def test_bfloat16_rows_equal_peft_on_a_bfloat16_base(bf16_model, name, native):
    """PEFT upcasts LoRA and (IA)3 to float32 over a bfloat16 base and casts the sum back (docs/adapters.md
    §7), as the engine does, so with the same PyTorch products the two agree bit for bit here, not just
    within bf16 noise; DoRA within one bfloat16 step of the logits (its magnitude scale is rounded at
    another point). The native LoRA kernel of small batches sums the same float32 products in another
    order, so a sum may round to the neighbouring bfloat16: within one bfloat16 step too."""
    ours = our_logits(bf16_model, name, "cpu", BF16, native)
    lib = peft_logits(tiny_model().to(BF16), name)
    assert torch.equal(ours.argmax(-1), lib.argmax(-1))
    if name.startswith("dora") or (native and name.startswith("lora")):
        assert one_bf16_step(ours, lib)
    else:
        assert torch.equal(ours, lib)
    assert (logprobs(lib) - logprobs(refs()[name])).abs().max().item() > 1e-4  # bf16 is not float32: the test can fail


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("name", BF16_AH)
def test_bfloat16_rows_close_to_adapterhub_on_a_bfloat16_base(bf16_model, name, native):
    """AdapterHub computes the bottleneck in bfloat16 too, but rounds at other points (the engine folds
    the output scale into the up-projection, for one; the native bottleneck kernel of small batches rounds
    the up product, its bias and the residual once). Both are roundings of one float32 function, so
    |ours - library| <= |ours - f32| + |library - f32|; the bound asserted is twice the library's own
    distance from its float32 reference (measured: 1.1x to 1.4x), and greedy tokens agree wherever the
    library's top two are further apart than twice its own drift (not a near-tie at bf16's precision)."""
    lib = load_file(FIXTURES / "refs_bf16_adapterhub.safetensors")[f"bf16/{name}"]
    ours = our_logits(bf16_model, name, "cpu", BF16, native)
    lib_drift = (logprobs(lib) - logprobs(refs()[name])).abs().max().item()
    diff = (logprobs(ours) - logprobs(lib)).abs().max().item()
    assert diff <= 2 * lib_drift + 1e-3, f"{name}: {diff:.4f} against the library's own bf16 drift {lib_drift:.4f}"
    clear = clear_argmax(lib, 2 * lib_drift)
    assert clear.any() and torch.equal(ours.argmax(-1)[clear], lib.argmax(-1)[clear])
    bare = our_logits(bf16_model, None, "cpu", BF16)
    assert (logprobs(lib) - logprobs(bare)).abs().max().item() > 0.1  # the library's adapter was active


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["lora_qv", "lora_all_linear", "lora_bias", "dora_qv", "ia3_default", "ia3_ff_in"])
def test_adapters_on_a_quantized_base_equal_peft_on_the_same_base(scheme, name, native):
    """The QLoRA setting: adapters unquantized on quantized base weights. PEFT wraps the same QuantLinear
    layers (DoRA's norms from their dequantized weights), and the engine's PyTorch products give its
    logits exactly; the native LoRA kernel (another summation order) within one bfloat16 step."""
    model = tiny_model().to(BF16)
    assert quantize_model(model, scheme, BF16) > 0
    ours = our_logits(model, name, "cpu", BF16, native)
    lib = peft_logits(copy.deepcopy(model), name)
    if native and name.startswith("lora"):
        assert torch.equal(ours.argmax(-1), lib.argmax(-1)) and one_bf16_step(ours, lib)
    else:
        assert torch.equal(ours, lib), f"{name} on {scheme}: max |diff| {(ours - lib).abs().max().item():.2e}"
    bare = our_logits(model, None, "cpu", BF16)
    assert not torch.equal(ours, bare)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(128, 64), (192, 576), (64, 1536), (96, 64)])
def test_quantized_kernels_compute_with_the_weights_they_hold(scheme, shape):
    """Each product equals F.linear with the layer's dequantized weight up to one bf16 rounding, and that
    weight is the float32 one up to half the scheme's step (int8: max |w| / 127; int4: a group's range
    / 15) and bfloat16's rounding. A shape the int4 packing cannot take (96 rows) is held as int8."""
    N, K = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=True)
    q = QuantLinear(lin, scheme if N % 64 == 0 else "int8", BF16)
    x = torch.randn(2, 3, K, dtype=BF16)
    want = F.linear(x, q.weight, q.bias)
    assert (q(x) - want).abs().max().item() <= 2**-7 * want.abs().max().item()
    w = lin.weight.detach()
    step = w.abs().max().item() / 127 if q.scheme == "int8" else (w.amax(1) - w.amin(1)).max().item() / 15
    bf16 = 2**-7 * w.abs().max().item()  # the scales and the dequantized values are bfloat16
    assert (q.weight.float() - w).abs().max().item() <= step / 2 + bf16  # rounded to the nearest step


def test_dtype_auto_is_bfloat16_where_the_cpu_computes_it_and_quantization_needs_it():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (BF16 if native_bf16() else torch.float32)
    assert resolve_dtype("auto", cpu, "int4") == BF16
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ModelLoadError, match="computes in bfloat16"):
        resolve_dtype("float32", cpu, "int8")


def test_a_model_folder_loads_quantized(tmp_path):
    loaded = load_base_model(ModelConfig(str(MODEL_DIR), "cpu", "auto", tmp_path, "int4"))
    q = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert loaded.dtype == BF16 and len(q) == 3 * 7 + 1  # every decoder Linear and the LM head
    assert {m.scheme for m in q} == {"int4", "int8"}  # the LM head, and k/v (32 rows), take int8


def test_nothing_folds_into_quantized_weights_and_adapter_info_says_so(tmp_path):
    model = tiny_model().to(BF16)
    quantize_model(model, "int8", BF16)
    e = make_engine(tmp_path / "s", model=model, dtype=BF16, merge="auto")
    for a in ("ia3_default", "lora_qv"):
        e.registry.add_folder(a, FIXTURES / "peft" / a)
        info = e.registry.info(a)
        assert info["mergeable"] is False and "quantized (int8)" in info["merge_note"]
    cols = [Collector() for _ in range(4)]
    for i, c in enumerate(cols):
        e.submit(req(e, i, "ia3_default", "hello world", max_new_tokens=12), c)
    run_until_done(e, cols)  # every row on one foldable adapter for 12 steps: would fold on a plain base
    assert e.slots.merged_slot is None and e.slots.methods["ia3"].merged_slot is None
    assert all(c.result.finish_reason == "length" for c in cols)


def test_int4_weights_read_back_on_any_cpu_and_repack_plainly_for_other_devices():
    """The CPU packing's layout is the host's own (AVX2 and AVX-512 differ): reading it back goes through
    the kernel, and the plain layout used off the CPU holds the same values."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = QuantLinear(lin, "int4", BF16)
    vals = quantize_int4(lin.weight.detach())[0]
    assert torch.equal(unpack_int4(q.qweight, 64, 128), vals)
    assert torch.equal(unpack_nibbles(pack_nibbles(vals)), vals)
    plain = QuantLinear(lin, "int4", BF16, cpu=False)  # quantized for another device: never the CPU packing
    assert not plain.cpu_packed and torch.equal(plain.weight, q.weight)
    x = torch.randn(3, 128, dtype=BF16)
    assert torch.equal(plain(x), F.linear(x, q.weight))  # back on the CPU, it computes from its plain layout
    q._apply(lambda t: t)  # a move that stays on the CPU keeps the kernel's packing
    assert q.cpu_packed
