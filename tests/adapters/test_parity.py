"""Our logits equal the training libraries' (HF PEFT, AdapterHub adapters) for every fixture config,
alone and when every config shares one batch with the others and with the bare base model."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    AH_DIR,
    PEFT_DIR,
    fixture_dir,
    full_logits,
    input_ids,
    parse_folder,
    refs,
    runner_and_slots,
    tiny_model,
)

TOL = 1e-5
NAMES = sorted(p.name for p in PEFT_DIR.iterdir()) + sorted(p.name for p in AH_DIR.iterdir())


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def references():
    return refs()


def test_base_model_matches_transformers(model, references):
    runner, slots = runner_and_slots(model)
    out = full_logits(runner, slots, input_ids(), [0, 0])
    assert (out - references["base"]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_adapter_matches_library(model, references, name):
    runner, slots = runner_and_slots(model)
    w = parse_folder(fixture_dir(name), model)
    slots.write(3, w)
    out = full_logits(runner, slots, input_ids(), [3, 3])
    err = (out - references[name]).abs().max().item()
    assert err <= TOL, f"{name}: max |diff| {err:.2e}"
    # sanity: the reference is not the base model, so the test can fail
    assert (references[name] - references["base"]).abs().max().item() > 1e-2


def test_every_config_in_one_mixed_batch(model, references):
    """One forward pass: each row its own adapter (or none), all methods and widths side by side."""
    runner, slots = runner_and_slots(model, num_slots=len(NAMES), rows=2 * (len(NAMES) + 1))
    ids = input_ids()
    row_slots, expected, batch = [], [], []
    for i, name in enumerate(NAMES, start=1):
        slots.write(i, parse_folder(fixture_dir(name), model))
    for j in range(2):  # both prompts
        for i, name in enumerate(NAMES, start=1):
            row_slots.append(i)
            expected.append(references[name][j])
            batch.append(ids[j])
        row_slots.append(0)
        expected.append(references["base"][j])
        batch.append(ids[j])
    out = full_logits(runner, slots, torch.stack(batch), row_slots)
    errs = [(out[b] - expected[b]).abs().max().item() for b in range(len(batch))]
    assert max(errs) <= TOL, f"worst row {errs.index(max(errs))}: {max(errs):.2e}"


def test_lora_rows_of_several_adapters_equal_peft_in_any_order_and_after_a_slot_is_rewritten(model, references):
    """Grouped LoRA products keep each set of adapters' blocks stacked across batches (LoRAMethod._stacked):
    batches of the same adapters in other row orders reuse them and equal PEFT, and once a slot is written
    with another adapter, no batch reads the blocks stacked while it held the first."""
    runner, slots = runner_and_slots(model, rows=6)
    names = {0: "base", 1: "lora_all_linear", 2: "lora_qv", 3: "dora_qv"}
    for s, n in names.items():
        if s:
            slots.write(s, parse_folder(fixture_dir(n), model))
    ids = input_ids()

    def check(order: list[int], names: dict[int, str]) -> None:
        out = full_logits(runner, slots, ids.repeat(len(order) // 2, 1), order)
        for b, s in enumerate(order):
            err = (out[b] - references[names[s]][b % 2]).abs().max().item()
            assert err <= TOL, (order, names[s], err)

    check([1, 1, 2, 2, 0, 0], names)
    check([2, 1, 0, 1, 2, 0], names)
    check([3, 1, 2, 3, 1, 2], names)  # same set of adapters, other rows: the stacked blocks serve
    slots.write(2, parse_folder(fixture_dir("lora_rslora"), model))
    check([1, 2, 2, 1, 0, 0], {**names, 2: "lora_rslora"})
