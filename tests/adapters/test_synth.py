"""The demo adapters (`adapter-server demo-adapters`) are real library layouts: they parse as their
family, and PEFT itself loads the PEFT ones and computes what we compute."""

from __future__ import annotations

import pytest
import torch

from server.adapters.methods import write_demo
from tests.helpers import full_logits, input_ids, parse_folder, runner_and_slots, tiny_model


@pytest.mark.parametrize(("kind", "method"), [("ia3", "ia3"), ("lora8", "lora"), ("dora8", "dora"), ("seq_bn", "bottleneck"),
                                              ("double_seq_bn", "bottleneck"), ("par_bn", "bottleneck"), ("prompt", "prompt"),
                                              ("prefix7", "prefix"), ("compacter", "bottleneck"), ("tokens", "vocab"),
                                              ("head", "vocab")])
def test_demo_adapters_parse_as_their_family(tmp_path, kind, method):
    model = tiny_model()
    w = parse_folder(write_demo(kind, tmp_path / kind, model.config, seed=1), model)
    assert w.method == method


@pytest.mark.parametrize("kind", ["lora8", "dora8", "prompt4", "prefix5", "tokens8", "head"])
def test_peft_computes_what_we_compute_on_the_demo_peft_adapters(tmp_path, kind):
    from peft import PeftModel

    model = tiny_model()
    folder = write_demo(kind, tmp_path / kind, model.config, seed=1)
    runner, slots = runner_and_slots(model)
    slots.write(1, parse_folder(folder, model))
    ours = full_logits(runner, slots, input_ids(), [1] * input_ids().shape[0])
    with torch.inference_mode():  # one row at a time: PEFT is not pad-aware for virtual tokens
        pm = PeftModel.from_pretrained(tiny_model(), str(folder))
        ref = torch.cat([pm(input_ids()[b : b + 1]).logits[:, -input_ids().shape[1] :] for b in range(len(input_ids()))])
    base = full_logits(runner, slots, input_ids(), [0] * input_ids().shape[0])
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the output
    assert (ours - ref).abs().max() < 1e-5
