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
from tests.fixtures.make_arch_fixtures import (
    ARCH_DIR,
    GREEDY_STEPS,
    HUB_ARCHS,
    HUB_FAMILIES,
    PEFT_FAMILIES,
)
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


HUB = list(HUB_FAMILIES)


def hub_dir(arch: str, family: str):  # noqa: ANN201
    return ARCH_DIR / arch / "hub" / family


def model_of(arch: str):  # noqa: ANN201
    return freeze(AutoModelForCausalLM.from_pretrained(ARCH_DIR / arch / "model"))


@functools.cache
def refs(arch: str) -> dict[str, torch.Tensor]:
    """PEFT's references, and AdapterHub's where it serves the architecture (its names do not overlap)."""
    out = load_file(ARCH_DIR / arch / "refs.safetensors")
    hub = ARCH_DIR / arch / "refs_hub.safetensors"
    return out | (load_file(hub) if hub.is_file() else {})


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
def test_a_prefill_of_unequal_prompts_computes_their_real_tokens_and_equals_each_alone(arch):
    """Every family (AdapterHub's too where it serves the base) and the bare model in one prefill of prompts
    of unequal lengths: the pass runs their real tokens only, each its own row of a token-by-token plan
    (ModelRunner._packed), and every row's last logits and every prompt position's equal the row run
    alone, unpadded; the full-length rows equal the library's logits."""
    model = model_of(arch)
    names = [*families(arch), *(HUB if arch in HUB_ARCHS else [])]
    runner, slots = runner_and_slots(model, num_slots=len(names), rows=len(names) + 1)
    for s, name in enumerate(names, start=1):
        slots.write(s, parse_folder(hub_dir(arch, name) if name in HUB else peft_dir(arch, name), model))
    ids, T = input_ids(), input_ids().shape[1]
    rows = [(s, s % 2, T - (s % 3) * 2) for s in range(len(names) + 1)]  # (slot, prompt, length)
    prefixes = [slots.prefix(s) for s, _, _ in rows]
    for b, p in enumerate(prefixes):
        if p is not None:
            runner.write_prefix(b, p.keys, p.values)
    starts = torch.tensor([0 if p is None else p.length for p in prefixes])
    shifts = torch.tensor([0 if p is None else p.rope_shift for p in prefixes])
    lengths = torch.tensor([n for _, _, n in rows])
    padded = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (_, i, n) in enumerate(rows):
        padded[b, :n] = ids[i, :n]
    tokens = slots.plan([s for s, _, n in rows for _ in range(n)], cached=False)
    kv_len = int((starts + lengths).max())
    last, full = runner.forward_full(padded, start=starts, lengths=lengths, plan=slots.plan([s for s, _, _ in rows]),
                                     kv_len=kv_len, rope_shift=shifts if shifts.any() else None,
                                     full_rows=list(range(len(rows))), token_plan=tokens)
    assert full is not None
    for b, (s, i, n) in enumerate(rows):
        name = ["base", *names][s]
        alone = runner.forward(padded[b : b + 1, :n], start=starts[b : b + 1], lengths=lengths[b : b + 1], row0=b,
                               plan=slots.plan([s]), all_logits=True, rope_shift=shifts[b : b + 1] if shifts.any() else None)
        assert err(last[b], alone[0, n - 1]) < 1e-5, name
        assert err(full[b, :n], alone[0]) < 1e-5, name
        if n == T:
            assert err(last[b], refs(arch)[name][i, T - 1]) < 1e-5, name


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_stays_exact(arch):
    model = model_of(arch)
    runner, slots = runner_and_slots(model)
    folders = [(n, peft_dir(arch, n)) for n in MERGEABLE]
    folders += [(n, hub_dir(arch, n)) for n in ("hub_lora", "hub_ia3")] if arch in HUB_ARCHS else []
    for name, folder in folders:
        weights = parse_folder(folder, model)
        if not weights.mergeable:  # LoRA on the experts is served unfolded (PEFT's all-linear reaches them on MoE)
            assert architecture(model.config.model_type).moe and weights.payload.experts, name
            continue
        slots.write(1, weights)
        slots.merge(1)
        assert slots.merged_slot == 1
        assert err(full_logits(runner, slots, input_ids(), [1, 1]), refs(arch)[name]) < 1e-5, name
        slots.unmerge()
        assert err(full_logits(runner, slots, input_ids(), [0, 0]), refs(arch)["base"]) < 1e-5, name


def greedy(engine, adapters: list[str]) -> dict[tuple[str, int], tuple[list[int], list[float]]]:  # noqa: ANN001
    """These adapters and the bare model on both prompts, GREEDY_STEPS tokens; half join while the rest decode."""
    cases = [(a, b) for a in [None, *adapters] for b in range(input_ids().shape[0])]
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
    assert_greedy_equals_library(arch, {a: peft_dir(arch, a) for a in families(arch)}, graphs, tmp_path)


def assert_greedy_equals_library(arch: str, folders: dict, graphs: str, tmp_path) -> None:  # noqa: ANN001
    """An engine on the base holding these adapters decodes every one of them (and the bare model) mixed,
    through the dynamic step or the fixed-shape one, to the library's greedy tokens and logprobs."""
    e = make_engine(tmp_path, slots=len(folders), model=model_of(arch), graphs=graphs)
    for a, folder in folders.items():
        e.registry.add_folder(a, folder)
    got = greedy(e, list(folders))
    if graphs == "on":
        assert e.graphs is not None and e.graphs.eager_steps > 0
    r = refs(arch)
    for (name, b), (tokens, logprobs) in got.items():
        assert list(tokens) == r[f"greedy_tokens/{name}"][b].tolist(), (name, b)
        assert err(torch.tensor(logprobs), r[f"greedy_logprobs/{name}"][b]) < 1e-5, (name, b)


@pytest.mark.parametrize("arch", HUB_ARCHS)
def test_every_adapterhub_family_alone_and_mixed_with_every_peft_family_equals_its_library(arch):
    """AdapterHub 1.3.0 places bottlenecks on these bases through its plugin interface (on Gemma, around
    the post-norms): each family equals the library alone, and in one batch with every PEFT family."""
    model = model_of(arch)
    names = [*HUB, *families(arch)]
    runner, slots = runner_and_slots(model, num_slots=len(names), rows=2 * (len(names) + 1))
    for s, name in enumerate(names, start=1):
        slots.write(s, parse_folder(hub_dir(arch, name) if name in HUB else peft_dir(arch, name), model))
        if name in HUB:
            assert err(full_logits(runner, slots, input_ids(), [s, s]), refs(arch)[name]) < 1e-5, name
    mixed = full_logits(runner, slots, input_ids().repeat(len(names) + 1, 1),
                        [s for s in range(len(names) + 1) for _ in range(2)])
    for s, name in enumerate(["base", *names]):
        assert err(mixed[2 * s : 2 * s + 2], refs(arch)[name]) < 1e-5, name


@pytest.mark.parametrize("graphs", ["off", "on"])
@pytest.mark.parametrize("arch", HUB_ARCHS)
def test_greedy_decoding_of_adapterhub_families_mixed_equals_the_library(arch, graphs, tmp_path):
    assert_greedy_equals_library(arch, {a: hub_dir(arch, a) for a in HUB}, graphs, tmp_path)


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


@pytest.mark.parametrize("arch", ["phi3", "qwen3_moe", "mixtral"])
def test_adapterhub_adapters_are_refused_where_the_library_has_no_support(arch):
    base = BaseModelInfo.from_model(model_of(arch))
    with pytest.raises(UnsupportedAdapterError, match=f"{arch}.*does not support"):
        parse_adapter(folder_files(fixture_dir("seq_bn")), base)


@pytest.mark.parametrize("name, why", [("seq_bn_sigmoid_noorig", "original_ln_after"), ("hub_prefix", "no prefix tuning")])
def test_what_adapterhub_refuses_on_its_interface_bases_is_refused(name, why):
    """Saved on the tiny Llama (built-in modules), uploaded to Gemma 2: the library itself refuses both there."""
    base = BaseModelInfo.from_model(model_of("gemma2"))
    with pytest.raises(UnsupportedAdapterError, match=why):
        parse_adapter(folder_files(fixture_dir(name)), base)


def test_the_text_model_of_a_multimodal_gemma3_folder_is_served_and_its_vision_tower_refused(tmp_path):
    """A `gemma3` folder (Gemma3ForConditionalGeneration, built here from a tiny config): the text decoder
    equals the library's logits on text, and an adapter on the vision tower is a 400 naming it."""
    import transformers as tf
    from safetensors.torch import save_file

    from tests.fixtures.make_arch_fixtures import _config

    cfg = tf.Gemma3Config(text_config=_config("gemma3").to_dict(), mm_tokens_per_image=1, image_token_index=255,
                          boi_token_index=254, eoi_token_index=253,
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    tf.Gemma3ForConditionalGeneration(cfg).save_pretrained(tmp_path / "mm")
    model = freeze(AutoModelForCausalLM.from_pretrained(tmp_path / "mm"))
    assert architecture(model.config.model_type).decoder == "model.language_model"
    with torch.no_grad():
        want = model(input_ids()).logits
    runner, slots = runner_and_slots(model)
    assert err(full_logits(runner, slots, input_ids(), [0, 0]), want) < 1e-5
    base = BaseModelInfo.from_model(model)
    assert base.linears and all(n.startswith("model.language_model.layers.") for n in base.linears)
    folder = tmp_path / "vision_lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    key = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 32), f"{key}.lora_B.weight": torch.zeros(32, 2)},
              folder / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="vision tower"):
        parse_adapter(folder_files(folder), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_stays_within_the_librarys_own_bfloat16_drift(arch):
    """On a bfloat16 base, the bare model and LoRA on every Linear (on MoE also the router and experts)
    against transformers' and PEFT's own bfloat16 forward: both round one float32 function at different
    points, so the bound is twice the library's own distance from its float32 reference; and greedy
    tokens agree with float32's wherever its top two are further apart than twice our drift."""
    from peft import PeftModel

    bf16 = torch.bfloat16

    def logprobs(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), -1)

    for name in ("base", "lora_all_linear"):
        lib_model = AutoModelForCausalLM.from_pretrained(ARCH_DIR / arch / "model", dtype=bf16).eval()
        if name != "base":
            lib_model = PeftModel.from_pretrained(lib_model, str(peft_dir(arch, name))).eval()
        with torch.no_grad():
            lib = torch.cat([lib_model(input_ids()[b : b + 1]).logits for b in range(2)]).float()
        model = freeze(AutoModelForCausalLM.from_pretrained(ARCH_DIR / arch / "model", dtype=bf16))
        runner, slots = runner_and_slots(model)
        row = 0 if name == "base" else 1
        if row:
            slots.write(1, parse_folder(peft_dir(arch, name), model))
        ours = full_logits(runner, slots, input_ids(), [row, row])
        drift = err(logprobs(lib), logprobs(refs(arch)[name]))
        assert drift > 1e-4, name  # bfloat16 is not float32: the test can fail
        assert err(logprobs(ours), logprobs(lib)) <= 2 * drift + 1e-3, (name, err(logprobs(ours), logprobs(lib)), drift)
        # greedy tokens: ours equal float32's wherever its top two are further apart than twice our own drift
        # (PEFT's bfloat16 adds expert deltas to bfloat16 weights, so on MoE it drifts too far to compare tokens)
        ref, ours_drift = refs(arch)[name], err(logprobs(ours), logprobs(refs(arch)[name]))
        top2 = logprobs(ref).topk(2, -1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * ours_drift
        # (in bfloat16 a router near a tie picks another expert for a token, in the library as in ours, which
        # moves this tiny MoE's logprobs by about 0.3: there no position may be clear)
        assert clear.any() or architecture(model.config.model_type).moe, (name, drift, ours_drift)
        assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear]), (name, drift, ours_drift)


@pytest.mark.parametrize("change, why", [
    ({"target_parameters": ["mlp.experts.down_proj", "mlp.shared_expert.weight"]}, "shared_expert.weight.*not served"),
    ({"use_dora": True}, "use_dora"),  # DoRA's magnitude on expert weights: PEFT saves no such adapter we serve
    ({"target_parameters": None}, "without target_parameters"),
    ({"target_parameters": 1}, "must be a list"),
])
def test_expert_adapters_we_do_not_serve_are_refused_naming_the_field(change, why, tmp_path):
    import json
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(peft_dir("qwen3_moe", "lora_experts"), folder)
    cfg = json.loads((folder / "adapter_config.json").read_text()) | change
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    from server.errors import InvalidAdapterError

    with pytest.raises((UnsupportedAdapterError, InvalidAdapterError), match=why):
        parse_folder(folder, model_of("qwen3_moe"))


def test_expert_groups_are_counted_exactly_with_thousands_of_groups():
    """33 slots x 128 experts: a float histogram (the library's count) puts some ids into the next bin."""
    from server.engine.moe import group_offsets

    g = torch.Generator().manual_seed(0)
    ids, _ = torch.sort(torch.randint(0, 33 * 128, (5000,), generator=g))
    want = torch.cumsum(torch.bincount(ids, minlength=33 * 128), 0).to(torch.int32)
    assert torch.equal(group_offsets(ids, 33 * 128), want)


def test_longrope_rows_each_pick_their_own_factors():
    """Phi-3's LongRoPE switches to its long factors past the original context for a whole call; a row
    batched with a longer one (or with graph padding) must keep the factors it has alone."""
    import transformers as tf

    from tests.fixtures.make_arch_fixtures import SMALL

    half = 16 // 2 // 2  # head_dim 16, partial rotary 0.5: 4 frequencies
    small = {k: v for k, v in SMALL.items() if k not in ("head_dim", "max_position_embeddings")}
    cfg = tf.Phi3Config(**small, num_hidden_layers=2, partial_rotary_factor=0.5, max_position_embeddings=64,
                        original_max_position_embeddings=8,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                         "original_max_position_embeddings": 8, "short_factor": [1.0, 1.2, 1.5, 2.0][:half],
                                         "long_factor": [3.0, 5.0, 9.0, 17.0][:half]})
    torch.manual_seed(0)
    model = freeze(tf.Phi3ForCausalLM(cfg).eval())
    ids = input_ids()  # 12 tokens: past the original 8
    with torch.no_grad():
        long_alone = model(ids[:1]).logits[0, -1]
        short_alone = model(ids[1:, :5]).logits[0, -1]
    runner, slots = runner_and_slots(model)
    got = runner.forward(ids, start=torch.zeros(2, dtype=torch.long), lengths=torch.tensor([12, 5]), row0=0,
                         plan=slots.plan([0, 0]))
    assert err(got[0], long_alone) < 1e-5 and err(got[1], short_alone) < 1e-5
    with torch.no_grad():
        assert err(model(ids[1:, :5]).logits[0, -1], model(ids[1:]).logits[0, 4]) > 1e-3  # the factors matter


def test_an_adapterhub_adapter_trained_through_another_interface_is_refused(tmp_path):
    import json
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(hub_dir("gemma2", "seq_bn"), folder)
    saved = json.loads((folder / "adapter_interface.json").read_text())
    saved["interface"]["layer_ln_2"] = None  # a custom interface without Gemma's post-norm
    (folder / "adapter_interface.json").write_text(json.dumps(saved))
    with pytest.raises(UnsupportedAdapterError, match="layer_ln_2"):
        parse_folder(folder, model_of("gemma2"))
