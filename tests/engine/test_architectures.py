"""Bases beyond Llama, each a description in server/architectures.py. On each: the bare model equals
Hugging Face's own forward, and every adapter family its training library serves there equals the
library's logits (fixtures it wrote, tests/fixtures/make_fixtures.py), alone, in one mixed batch, folded,
and through the fixed-shape decode step that CUDA graphs replay (run eagerly on the CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from server.adapters.formats import parse_adapter
from server.adapters.spec import BaseModelInfo
from server.architectures import architecture
from server.engine.model_loader import freeze
from server.errors import UnsupportedAdapterError
from tests.engine.test_graphs import PROMPTS, run_mixed
from tests.fixtures.make_fixtures import QWEN3_DIR, QWEN3_PEFT, QWEN3_PEFT_DIR
from tests.helpers import (
    FIXTURES,
    fixture_dir,
    folder_files,
    full_logits,
    input_ids,
    make_engine,
    parse_folder,
    runner_and_slots,
)

QWEN3 = list(QWEN3_PEFT)


def qwen3_dir(name: str):  # noqa: ANN201
    return QWEN3_PEFT_DIR / name


def qwen3():  # noqa: ANN201
    return freeze(AutoModelForCausalLM.from_pretrained(QWEN3_DIR))


def refs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "refs_qwen3.safetensors")


def test_qwen3_is_described_and_the_bare_model_equals_the_library():
    assert architecture("qwen3").qk_norm and not architecture("llama").qk_norm
    model = qwen3()
    runner, slots = runner_and_slots(model)
    assert (full_logits(runner, slots, input_ids(), [0, 0]) - refs()["qwen3_base"]).abs().max().item() < 1e-5


def test_qwen3_every_peft_family_alone_and_in_one_mixed_batch_equals_peft():
    model = qwen3()
    runner, slots = runner_and_slots(model, num_slots=len(QWEN3), rows=16)
    for s, name in enumerate(QWEN3, start=1):
        slots.write(s, parse_folder(qwen3_dir(name), model))
        got = full_logits(runner, slots, input_ids(), [s, s])
        assert (got - refs()[name]).abs().max().item() < 1e-5, name
    ids = input_ids().repeat(len(QWEN3) + 1, 1)  # every family and the bare model, both prompts, one pass
    row_slots = [s for s in range(len(QWEN3) + 1) for _ in range(2)]
    mixed = full_logits(runner, slots, ids, row_slots)
    for s, name in enumerate(["qwen3_base", *QWEN3]):
        assert (mixed[2 * s : 2 * s + 2] - refs()[name]).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("name", ["qwen3_ia3", "qwen3_lora_all_linear", "qwen3_dora"])
def test_qwen3_folding_stays_exact(name):
    model = qwen3()
    runner, slots = runner_and_slots(model)
    slots.write(1, parse_folder(qwen3_dir(name), model))
    slots.merge(1)
    assert slots.merged_slot == 1
    assert (full_logits(runner, slots, input_ids(), [1, 1]) - refs()[name]).abs().max().item() < 1e-5


def test_qwen3_fixed_shape_decode_step_equals_the_dynamic_one(tmp_path):
    cases = [(a, p) for a in [None, *QWEN3] for p in PROMPTS[:2]]

    def engine(graphs: str, sub: str):  # noqa: ANN202
        e = make_engine(tmp_path / sub, slots=len(QWEN3), model=qwen3(), graphs=graphs)
        for a in QWEN3:
            e.registry.add_folder(a, qwen3_dir(a))
        return e

    ref = run_mixed(engine("off", "a"), cases)
    e = engine("on", "b")
    got = run_mixed(e, cases)
    assert e.graphs is not None and e.graphs.eager_steps > 0
    for (a, _), want, r in zip(cases, ref, got, strict=True):
        assert r.token_ids == want.token_ids, a
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(want.logprobs), atol=1e-5), a


def test_adapterhub_adapters_are_refused_on_a_base_where_their_placement_is_unchecked():
    base = BaseModelInfo.from_model(qwen3())
    with pytest.raises(UnsupportedAdapterError, match="qwen3"):
        parse_adapter(folder_files(fixture_dir("seq_bn")), base)
