"""(IA)3 folding: merged equals unmerged, unfolding restores the base weights byte for byte, the exported
folder loads in plain transformers and gives the adapter's outputs; bottleneck adapters refuse."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.adapters.methods import StepTimer
from server.adapters.slots import AdapterSlots
from server.config import ModelConfig
from server.engine.model_runner import ModelRunner
from server.errors import NotMergeableError
from server.export import export_merged
from tests.helpers import (
    TINY,
    fixture_dir,
    full_logits,
    input_ids,
    make_engine,
    parse_folder,
    refs,
    req,
    runner_and_slots,
    solo,
    tiny_model,
)

IA3 = ["ia3_default", "ia3_all_out", "ia3_ff_in", "ia3_regex", "ia3_bin"]
LORA = ["lora_qv", "lora_all_linear", "lora_rslora", "lora_patterns", "dora_qv", "dora_rslora_all"]


@pytest.mark.parametrize("name", IA3 + LORA)
def test_merged_equals_unmerged_and_unmerge_is_bit_exact(name):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner, slots = runner_and_slots(model)
    slots.write(2, parse_folder(fixture_dir(name), model))
    unmerged = full_logits(runner, slots, input_ids(), [2, 2])
    slots.merge(2)
    method = slots.method_of(2)
    assert slots.merged_slot == 2 and slots.adapter_type(2) == f"{method}_merged"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "merging must change some weights"
    merged = full_logits(runner, slots, input_ids(), [2, 2])
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (merged - refs()[name]).abs().max().item() < 1e-5
    slots.unmerge()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored bit for bit"


def test_merge_twice_then_switch_adapter_restores_exactly():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner, slots = runner_and_slots(model)
    slots.write(1, parse_folder(fixture_dir("ia3_default"), model))
    slots.write(2, parse_folder(fixture_dir("ia3_all_out"), model))
    slots.merge(1)
    slots.merge(2)  # switching folds the other in, from the kept base weights
    assert (full_logits(runner, slots, input_ids(), [2, 2]) - refs()["ia3_all_out"]).abs().max().item() < 1e-5
    slots.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_with_a_lora_bias_is_not_mergeable_on_bias_free_linears():
    model = tiny_model()
    assert not parse_folder(fixture_dir("lora_bias"), model).mergeable
    assert parse_folder(fixture_dir("lora_qv"), model).mergeable


def test_a_slot_write_never_sees_folded_weights():
    """DoRA reads the base weight when its slot is written: any fold is undone first."""
    model = tiny_model()
    runner, slots = runner_and_slots(model)
    slots.write(1, parse_folder(fixture_dir("lora_all_linear"), model))
    slots.merge(1)
    slots.write(2, parse_folder(fixture_dir("dora_qv"), model))
    assert slots.merged_slot is None
    assert (full_logits(runner, slots, input_ids(), [2, 2]) - refs()["dora_qv"]).abs().max().item() < 1e-5


def test_bottleneck_is_not_mergeable(tmp_path):
    model = tiny_model()
    w = parse_folder(fixture_dir("seq_bn"), model)
    assert not w.mergeable
    e = make_engine(tmp_path / "s")
    e.registry.add_folder("bn", fixture_dir("seq_bn"))
    assert e.registry.info("bn")["mergeable"] is False
    with pytest.raises(NotMergeableError, match="never"):
        export_merged(ModelConfig(str(TINY)), tmp_path / "s", "bn", tmp_path / "out")


@pytest.mark.parametrize("name,tol", [("ia3_ff_in", 1e-5), ("lora_patterns", 1e-4), ("dora_qv", 1e-4)])
def test_exported_model_loads_in_plain_transformers(tmp_path, name, tol):
    e = make_engine(tmp_path / "s")
    e.registry.add_folder("ia", fixture_dir(name))
    # the tiny fixture folder has no tokenizer: give it one so the export is a complete model folder
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    e.tokenizer.save_pretrained(model_dir)
    out = export_merged(ModelConfig(str(model_dir)), tmp_path / "s", "ia", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = plain(input_ids()).logits
    assert (got - refs()[name]).abs().max().item() < tol  # folding LoRA rounds W + s B A once


def twin_engines(tmp_path, adapters: dict[str, str]):
    """An engine that folds (IA)3 when it pays and one that never folds, with the same adapters."""
    engines = make_engine(tmp_path / "a", merge="auto"), make_engine(tmp_path / "n", merge="never")
    for e in engines:
        for aid, src in adapters.items():
            e.registry.add_folder(aid, fixture_dir(src))
    return engines


def test_engine_folds_when_batch_is_uniform_and_unfolds_when_it_mixes(tmp_path):
    e_auto, e_never = twin_engines(tmp_path, {"ia": "ia3_default", "bn": "seq_bn"})
    base_weights = {k: v.clone() for k, v in e_auto.loaded.model.state_dict().items()}
    a = solo(e_auto, req(e_auto, 0, "ia", "the quick brown fox", max_new_tokens=60))
    n = solo(e_never, req(e_never, 0, "ia", "the quick brown fox", max_new_tokens=60))
    assert a.adapter_type == "ia3_merged" and n.adapter_type == "ia3"
    assert e_auto.slots.merged_slot is not None and e_never.slots.merged_slot is None
    assert a.token_ids == n.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, n.logprobs, strict=True)) < 1e-4
    # a mixed batch unfolds at once, restoring the base weights exactly
    solo(e_auto, req(e_auto, 1, "bn", "hello world", max_new_tokens=3))
    assert e_auto.slots.merged_slot is None
    assert all(torch.equal(v, base_weights[k]) for k, v in e_auto.loaded.model.state_dict().items())
    merged_secs = [s.value for s in e_auto.metrics.adapter_compute.collect()[0].samples
                   if s.labels.get("adapter_type") == "ia3_merged" and s.name.endswith("_total")]
    assert merged_secs and merged_secs[0] > 0


def test_auto_policy_folds_only_when_it_pays(tmp_path):
    e = make_engine(tmp_path / "a", merge="auto")
    e.registry.add_folder("ia", fixture_dir("ia3_default"))
    e.merge._fold_s, e.merge._unfolded_s = 1e6, 1e-4  # folding would cost more than any request could save
    r = solo(e, req(e, 0, "ia", "the quick brown fox", max_new_tokens=30))
    assert r.adapter_type == "ia3" and e.slots.merged_slot is None
    e.merge._fold_s = 1e-9  # now it pays
    r = solo(e, req(e, 1, "ia", "the quick brown fox", max_new_tokens=30))
    assert r.adapter_type == "ia3_merged" and e.slots.merged_slot is not None


def test_switching_uniform_adapter_never_runs_on_the_other_folded_in(tmp_path):
    e, ref = twin_engines(tmp_path, {"x": "ia3_default", "y": "ia3_ff_in"})
    assert solo(e, req(e, 0, "x", "hello world", max_new_tokens=40)).adapter_type == "ia3_merged"
    e.merge._fold_s = 1e6  # y will not pay for a fold: x must be unfolded for y's rows all the same
    got = solo(e, req(e, 1, "y", "the quick brown fox", max_new_tokens=12))
    want = solo(ref, req(ref, 1, "y", "the quick brown fox", max_new_tokens=12))
    assert got.adapter_type == "ia3" and got.token_ids == want.token_ids
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("name", ["ia3_all_out", "ia3_ff_in", "lora_all_linear", "dora_qv"])
def test_a_fold_keeps_the_packed_products_current_and_its_copy_is_held_only_while_folded(name):
    """q/k/v and gate/up run as one packed product whose weight the Linears' weights are views of: a fold
    through any method must write into those views (a new tensor would leave the packed product stale,
    with no error). The copy of the base weights a fold keeps is counted, and freed by the unfold."""
    model = tiny_model()
    runner = ModelRunner(model, 8, 512, pack=True)
    slots = AdapterSlots(model, 8, runner.device, runner.dtype, StepTimer(runner.device), encode=runner.prefix_kv)
    assert runner.packed and all("qkv" in p and "gate_up" in p for p in runner.packed)
    slots.write(2, parse_folder(fixture_dir(name), model))
    resident = slots.device_bytes()
    bare = full_logits(runner, slots, input_ids(), [0, 0])
    unmerged = full_logits(runner, slots, input_ids(), [2, 2])
    slots.merge(2)
    assert slots.device_bytes() > resident  # the base weights it changed, kept to restore them
    merged = full_logits(runner, slots, input_ids(), [2, 2])  # the packed products read the folded weights
    assert (merged - refs()[name]).abs().max().item() < 1e-5
    assert (merged - unmerged).abs().max().item() < 1e-5
    slots.unmerge()
    assert slots.device_bytes() == resident
    assert torch.equal(full_logits(runner, slots, input_ids(), [0, 0]), bare)  # the packed products restored too
