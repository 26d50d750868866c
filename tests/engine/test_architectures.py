"""Bases beyond Llama, each a description in server/architectures.py. On each: the bare model equals
Hugging Face's own forward, and every adapter family its training library serves there equals the
library's logits (fixtures it wrote, tests/fixtures/make_arch_fixtures.py) alone, in one mixed batch of
every family and the bare model, and folded; and the engine's greedy decoding over our KV cache, with
rows of every family joining one by one, gives the library's greedy tokens and logprobs, through the
dynamic decode step and the fixed-shape one that CUDA graphs replay (run eagerly on the CPU)."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from server.adapters.formats import parse_adapter
from server.adapters.spec import BaseModelInfo
from server.architectures import architecture
from server.engine.model_loader import freeze
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import UnsupportedAdapterError
from tests.fixtures.make_arch_fixtures import ARCH_DIR, GREEDY_STEPS, PEFT_FAMILIES
from tests.helpers import (
    Collector,
    fixture_dir,
    folder_files,
    full_logits,
    input_ids,
    make_engine,
    parse_folder,
    run_until_done,
    runner_and_slots,
)

ARCHS = list(PEFT_FAMILIES)
MERGEABLE = ("ia3", "lora_all_linear", "dora")


def families(arch: str) -> list[str]:
    return list(PEFT_FAMILIES[arch])


def model_of(arch: str):  # noqa: ANN201
    return freeze(AutoModelForCausalLM.from_pretrained(ARCH_DIR / arch / "model"))


@functools.cache
def refs(arch: str) -> dict[str, torch.Tensor]:
    return load_file(ARCH_DIR / arch / "refs.safetensors")


def peft_dir(arch: str, family: str):  # noqa: ANN201
    return ARCH_DIR / arch / "peft" / family


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_bare_model_equals_the_library(arch):
    model = model_of(arch)
    assert architecture(model.config.model_type) is not None
    runner, slots = runner_and_slots(model)
    assert err(full_logits(runner, slots, input_ids(), [0, 0]), refs(arch)["base"]) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_every_peft_family_alone_and_in_one_mixed_batch_equals_peft(arch):
    model = model_of(arch)
    fams = families(arch)
    runner, slots = runner_and_slots(model, num_slots=len(fams), rows=2 * (len(fams) + 1))
    for s, name in enumerate(fams, start=1):
        slots.write(s, parse_folder(peft_dir(arch, name), model))
        assert err(full_logits(runner, slots, input_ids(), [s, s]), refs(arch)[name]) < 1e-5, name
    ids = input_ids().repeat(len(fams) + 1, 1)  # every family and the bare model, both prompts, one pass
    row_slots = [s for s in range(len(fams) + 1) for _ in range(2)]
    mixed = full_logits(runner, slots, ids, row_slots)
    for s, name in enumerate(["base", *fams]):
        assert err(mixed[2 * s : 2 * s + 2], refs(arch)[name]) < 1e-5, name


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_stays_exact(arch):
    model = model_of(arch)
    runner, slots = runner_and_slots(model)
    for name in MERGEABLE:
        weights = parse_folder(peft_dir(arch, name), model)
        if not weights.mergeable:  # LoRA on the experts is served unfolded (PEFT's all-linear reaches them on MoE)
            assert architecture(model.config.model_type).moe and weights.payload.experts, name
            continue
        slots.write(1, weights)
        slots.merge(1)
        assert slots.merged_slot == 1
        assert err(full_logits(runner, slots, input_ids(), [1, 1]), refs(arch)[name]) < 1e-5, name
        slots.unmerge()
        assert err(full_logits(runner, slots, input_ids(), [0, 0]), refs(arch)["base"]) < 1e-5, name


def greedy(engine, arch: str) -> dict[tuple[str, int], tuple[list[int], list[float]]]:  # noqa: ANN001
    """Every family and the bare model on both prompts, GREEDY_STEPS tokens; half join while the rest decode."""
    cases = [(a, b) for a in [None, *families(arch)] for b in range(input_ids().shape[0])]
    cols = [Collector() for _ in cases]
    p = SamplingParams(max_new_tokens=GREEDY_STEPS, ignore_eos=True, logprobs=True)
    for i, (a, b) in enumerate(cases):
        engine.submit(GenerationRequest(f"r{i}", tuple(input_ids()[b].tolist()), a, p), cols[i])
        if i >= len(cases) // 2:
            engine.step()
    run_until_done(engine, cols)
    return {(a or "base", b): (c.result.token_ids, c.result.logprobs) for (a, b), c in zip(cases, cols, strict=True)}


@pytest.mark.parametrize("graphs", ["off", "on"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_of_every_family_mixed_equals_the_library(arch, graphs, tmp_path):
    fams = families(arch)
    e = make_engine(tmp_path, slots=len(fams), model=model_of(arch), graphs=graphs)
    for a in fams:
        e.registry.add_folder(a, peft_dir(arch, a))
    got = greedy(e, arch)
    if graphs == "on":
        assert e.graphs is not None and e.graphs.eager_steps > 0
    r = refs(arch)
    for (name, b), (tokens, logprobs) in got.items():
        assert list(tokens) == r[f"greedy_tokens/{name}"][b].tolist(), (name, b)
        assert err(torch.tensor(logprobs), r[f"greedy_logprobs/{name}"][b]) < 1e-5, (name, b)


def test_the_descriptions_say_what_differs():
    g2, g3, phi3 = architecture("gemma2"), architecture("gemma3_text"), architecture("phi3")
    assert architecture("qwen3").qk_norm and not architecture("llama").qk_norm
    assert g2.attn_softcap and not g3.attn_softcap  # Gemma 3's config has the field; the library ignores it
    assert g3.rope_per_layer_type and g3.qk_norm and g2.final_softcap == g3.final_softcap
    assert phi3.fused_qkv and phi3.fused_gate_up and not phi3.llama_layout and architecture("llama").llama_layout
    with pytest.raises(ValueError, match="gemma3n.*not served"):
        architecture("gemma3n")


def test_gemma3_ignores_the_attention_softcap_its_config_carries():
    model = model_of("gemma3")
    assert model.config.attn_logit_softcapping == 5.0
    runner, _ = runner_and_slots(model)
    assert runner.attn_softcap is None and runner.final_softcap == 3.0


def test_adapterhub_adapters_are_refused_on_a_base_where_their_placement_is_unchecked():
    base = BaseModelInfo.from_model(model_of("phi3"))
    with pytest.raises(UnsupportedAdapterError, match="phi3"):
        parse_adapter(folder_files(fixture_dir("seq_bn")), base)
