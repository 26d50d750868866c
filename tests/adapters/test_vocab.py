"""Trained embeddings and LM heads as PEFT saves them (modules_to_save, trainable tokens, LoRA on either end,
tokens added): our logits equal PEFT's on the fixtures it wrote (tests/fixtures/make_vocab_fixtures.py),
on an untied base (the tiny Llama) and a tied one (the tiny Gemma 3: scaled embedding, final soft-cap),
alone, and every one of them in one batch with every other family and the bare model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from server.adapters.formats import read_upload
from server.adapters.methods.vocab import VocabWeights
from server.adapters.spec import BaseModelInfo
from server.engine.model_loader import freeze
from server.errors import InvalidAdapterError
from tests.helpers import (
    FIXTURES,
    fixture_dir,
    folder_files,
    input_ids,
    parse_folder,
    refs,
    runner_and_slots,
)

TOL = 1e-5
VOCAB = FIXTURES / "vocab"
BASES = {"llama": FIXTURES / "tiny_llama", "gemma3": FIXTURES / "arch" / "gemma3" / "model"}
VARIANTS = [(b, p.name) for b in BASES for p in sorted((VOCAB / b).iterdir()) if p.is_dir()]
OTHERS = ["lora_qv", "ia3_default", "dora_qv", "prompt_tuning", "prefix_tuning", "seq_bn", "par_bn", "hub_lora_qv"]


def base_model(name: str) -> torch.nn.Module:
    return freeze(AutoModelForCausalLM.from_pretrained(BASES[name]))


@pytest.fixture(scope="module")
def models():
    return {b: base_model(b) for b in BASES}


@pytest.fixture(scope="module")
def vrefs():
    return {b: load_file(VOCAB / b / "refs.safetensors") for b in BASES}


def forward(runner, slots, rows: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """One prefill of right-padded rows (ids [T_b], slot), each after its adapter's KV prefix; each row's
    logits at its real tokens [T_b, V]."""
    dev = runner.device
    prefixes = [slots.prefix(s) for _, s in rows]
    starts = [0 if p is None else p.length for p in prefixes]
    lens = [len(ids) for ids, _ in rows]
    T, B = max(lens), len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        ids[b, : len(r)] = r
    for b, p in enumerate(prefixes):
        if p is not None:
            runner.write_prefix(b, p.keys, p.values)
    shifts = [0 if p is None else p.rope_shift for p in prefixes]
    out = runner.forward(ids.to(dev), start=torch.tensor(starts, device=dev), lengths=torch.tensor(lens, device=dev),
                         row0=0, plan=slots.plan([s for _, s in rows]), all_logits=True,
                         rope_shift=torch.tensor(shifts, device=dev) if any(shifts) else None)
    return [out[b, : lens[b]] for b in range(B)]


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |diff| over the reference's vocabulary; a wider batch pads a row with -inf past its own ids."""
    V = want.shape[-1]
    assert torch.isinf(got[..., V:]).all() and (got[..., V:] < 0).all(), "ids past the row's vocabulary must be -inf"
    return (got[..., :V] - want).abs().max().item()


@pytest.mark.parametrize("base,name", VARIANTS, ids=[f"{b}-{n}" for b, n in VARIANTS])
def test_variant_matches_peft(models, vrefs, base, name):
    model, r = models[base], vrefs[base]
    runner, slots = runner_and_slots(model)
    w = parse_folder(VOCAB / base / name, model)
    slots.write(2, w)
    ids = r[f"inputs/{name}"]
    got = forward(runner, slots, [(ids[b], 2) for b in range(ids.shape[0])])
    err = max(close(g, r[name][b]) for b, g in enumerate(got))
    assert err <= TOL, f"{base}/{name}: max |diff| {err:.2e}"
    if r[name].shape == r["base"].shape:  # the reference is not the bare model's: the test can fail
        assert (r[name] - r["base"]).abs().max().item() > 1e-2


def write_variants(slots, model, vrefs, base: str) -> tuple[list, list]:
    """Every variant of `base` in slots 1.., with its rows (both prompts) and PEFT's logits for them."""
    r, rows, want = vrefs[base], [], []
    for i, n in enumerate([n for b, n in VARIANTS if b == base], start=1):
        slots.write(i, parse_folder(VOCAB / base / n, model))
        ids = r[f"inputs/{n}"]
        rows += [(ids[b], i) for b in range(ids.shape[0])]
        want += [r[n][b] for b in range(ids.shape[0])]
    return rows, want


def assert_one_batch(runner, slots, rows: list, want: list) -> None:
    """The rows in one pass, shuffled so that no row sits by its twin: each equals its reference."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    got = forward(runner, slots, [rows[k] for k in order])
    errs = {k: close(g, want[k]) for k, g in zip(order, got, strict=True)}
    worst = max(errs, key=errs.__getitem__)
    assert errs[worst] <= TOL, f"row {worst} (slot {rows[worst][1]}): {errs[worst]:.2e}"


def test_every_variant_with_every_family_and_the_bare_model_in_one_batch(models, vrefs):
    """The tiny Llama's variants, eight other families and the bare model, both prompts of each, in one pass:
    rows of vocabularies of 256 and 258 ids side by side."""
    model, n = models["llama"], sum(b == "llama" for b, _ in VARIANTS)
    runner, slots = runner_and_slots(model, num_slots=n + len(OTHERS), rows=2 * (n + len(OTHERS) + 1))
    rows, want = write_variants(slots, model, vrefs, "llama")
    library = refs()
    for j, name in enumerate(OTHERS, start=n + 1):
        slots.write(j, parse_folder(fixture_dir(name), model))
        rows += [(input_ids()[b], j) for b in range(2)]
        want += [library[name][b] for b in range(2)]
    rows += [(input_ids()[b], 0) for b in range(2)]
    want += [library["base"][b] for b in range(2)]
    assert_one_batch(runner, slots, rows, want)


def test_the_tied_base_variants_in_one_batch(models, vrefs):
    model, n = models["gemma3"], sum(b == "gemma3" for b, _ in VARIANTS)
    runner, slots = runner_and_slots(model, num_slots=n, rows=2 * n + 2)
    rows, want = write_variants(slots, model, vrefs, "gemma3")
    rows += [(vrefs["gemma3"]["inputs/base"][b], 0) for b in range(2)]
    want += [vrefs["gemma3"]["base"][b] for b in range(2)]
    assert_one_batch(runner, slots, rows, want)


def test_what_each_layout_becomes(models):
    """The reductions docs/adapters.md §7 describes: trained rows stay rows, a trained copy is a table of its
    own, a saved base table (LoRA on an end, a vocabulary resized for training) keeps only its differing and
    added rows, and on a tied base trained embedding rows are the head's rows too."""
    llama, gemma = models["llama"], models["gemma3"]

    def vocab(base: str, name: str) -> VocabWeights:
        w = parse_folder(VOCAB / base / name, llama if base == "llama" else gemma)
        v = w.payload if w.method == "vocab" else w.extras["vocab"]
        assert isinstance(v, VocabWeights)
        return v

    v = vocab("llama", "tokens")
    assert v.head is None and v.embed is not None and v.embed.table is None and v.embed.index.tolist() == [3, 17, 42, 99, 250]
    v = vocab("llama", "mts_head")
    assert v.embed is None and v.head is not None and v.head.table is not None and v.head.table.shape == (256, 64)
    v = vocab("llama", "lora_head")  # its saved base layer equals the base's head: nothing kept of it
    assert v.head is not None and v.head.table is None and v.head.index is None and v.head.lora_A is not None
    v = vocab("llama", "added_tokens")  # resized tables saved whole: only the 18 trained (and 2 added) rows kept
    assert v.size == 258 and v.embed.index.tolist() == list(range(240, 258)) and v.head.index.tolist() == list(range(240, 258))
    v = vocab("gemma3", "tokens")  # tied: the embedding's trained rows are the head's rows as well
    assert v.head is not None and torch.equal(v.head.index, v.embed.index) and torch.equal(v.head.rows, v.embed.rows)
    v = vocab("gemma3", "mts_embed")  # tied, but a trained copy stays on its own end
    assert v.head is None and v.embed.table is not None
    v = vocab("gemma3", "lora_head")
    assert v.embed is None and v.head.lora_A is not None
    v = vocab("llama", "added_changed")  # saved base tables trained before the resize: their differing rows too
    assert sorted(v.embed.index.tolist()) == [5, 17, 42, 256, 257] and sorted(v.head.index.tolist()) == [7, 9, 256, 257]
    v = vocab("llama", "shrunk_head")  # resized down: the embedding keeps the base's rows, 248 of them
    assert v.size == 248 and v.embed is not None and v.embed.size == 248 and v.embed.index is None and v.head.lora_A is not None
    v = vocab("gemma3", "added_tied")  # one trained copy under both ends, the head's plain key included
    assert v.size == 258 and torch.equal(v.embed.table, v.head.table)


def test_a_tokenizer_must_fit_the_vocabulary(models, tmp_path):
    """An upload is read whole: its tokenizer's ids must be rows its embedding and head have."""
    model = models["llama"]
    info = BaseModelInfo.from_model(model)

    def folder(src: Path, drop: tuple[str, ...] = (), add_from: Path | None = None) -> dict[str, Path]:
        files = {k: v for k, v in folder_files(src).items() if k not in drop}
        if add_from is not None:
            files |= {k: v for k, v in folder_files(add_from).items() if k.startswith(("tokenizer", "chat_template"))}
        return files

    w, fp = read_upload(folder(VOCAB / "llama" / "added_mts"), info)
    assert fp is not None and fp.startswith("sha256:") and w.vocab_size == 258
    w, fp = read_upload(folder(VOCAB / "llama" / "mts_head"), info)
    assert fp is None and w.vocab_size == 256
    # tokens added to the tokenizer, but the adapter has the base's 256 rows
    with pytest.raises(InvalidAdapterError, match="258 tokens, but the base model's embedding has 256 rows"):
        read_upload(folder(fixture_dir("lora_qv"), add_from=VOCAB / "llama" / "added_mts"), info)
    # 258 rows, and no tokenizer saying what ids 256 and 257 are
    with pytest.raises(InvalidAdapterError, match="upload the tokenizer it was trained with"):
        read_upload(folder(VOCAB / "llama" / "added_mts", drop=("tokenizer.json", "tokenizer_config.json",
                                                                 "chat_template.jinja")), info)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(InvalidAdapterError, match="tokenizer cannot be loaded"):
        read_upload(folder(VOCAB / "llama" / "mts_head") | {"tokenizer.json": tmp_path / "tokenizer.json"}, info)


def test_a_partial_tokenizer_lays_over_the_base_one(models, tmp_path):
    """A folder that brings only a chat template (or a tokenizer_config) keeps the base tokenizer's vocabulary
    with its own template: laid over the base's files, fingerprinted with them."""
    from transformers import AutoTokenizer

    from server.adapters.formats.tokenizer import load_tokenizer

    model = models["llama"]
    info = BaseModelInfo.from_model(model, AutoTokenizer.from_pretrained(BASES["llama"]))
    assert "tokenizer.json" in info.tokenizer_files
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    files = folder_files(fixture_dir("lora_qv")) | {"chat_template.jinja": tmp_path / "chat_template.jinja"}
    w, fp = read_upload(files, info)
    assert fp is not None and w.vocab_size == 0
    got = load_tokenizer(files, info.tokenizer_files)
    assert got is not None and got[0] == fp and len(got[1]) == info.tokenizer_size
    assert got[1].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    # over a base that has a template of its own, the adapter's wins, in a tokenizer_config as in a .jinja file
    base_files = {**info.tokenizer_files, "chat_template.jinja": b"BASE{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "ADAPTER{{ messages[0][\'content\'] }}"}')
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        got = load_tokenizer({name: tmp_path / name}, base_files)
        assert got is not None and not got[1].apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("BASE")
    # the fingerprint is the folder's own files': a base tokenizer re-saved other bytes does not change it
    assert load_tokenizer(files, base_files)[0] == fp


EXPORTS = [("llama", "added_mts"), ("llama", "added_tokens"), ("llama", "added_changed"), ("llama", "shrunk_head"),
           ("llama", "lora_embed"), ("llama", "tokens_both"), ("gemma3", "mts_head"), ("gemma3", "lora_tied"),
           ("gemma3", "added_tokens"), ("gemma3", "added_tied")]


@pytest.mark.parametrize("base,name", EXPORTS, ids=[f"{b}-{n}" for b, n in EXPORTS])
def test_merge_writes_a_standalone_model_plain_transformers_loads(vrefs, tmp_path, base, name):
    """`adapter-server merge`: the adapter's ends as the model's own tables (the vocabulary resized, a tied
    head untied where the ends now differ), its tokenizer beside them; plain transformers gives PEFT's
    logits and greedy tokens."""
    from transformers import AutoTokenizer

    from server.config import ModelConfig
    from server.export import export_merged
    from tests.helpers import make_engine

    e = make_engine(tmp_path / "s", model=base_model(base))
    info = e.registry.add_folder("x", VOCAB / base / name)
    assert info["mergeable"] is (info["method"] != "vocab")
    out = export_merged(ModelConfig(str(BASES[base])), tmp_path / "s", "x", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    r = vrefs[base]
    ids = r[f"inputs/{name}"]
    assert plain.get_input_embeddings().weight.shape[0] == r[name].shape[-1]
    assert len(tok) == (258 if name.startswith("added") else 240)
    with torch.no_grad():
        got = plain(ids).logits
    assert (got - r[name]).abs().max().item() < 1e-4  # folding LoRA rounds W + s B A once
    tied = plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert tied == (base == "gemma3" and name in ("added_tokens", "lora_tied", "added_tied"))
    with torch.no_grad():
        for b in range(ids.shape[0]):
            seq = ids[b : b + 1]
            for _ in range(4):
                seq = torch.cat([seq, plain(seq).logits[:, -1:].argmax(-1)], dim=1)
            assert seq[0, ids.shape[1] :].tolist() == r[f"greedy_tokens/{name}"][b, :4].tolist()


@pytest.mark.parametrize("base,name", VARIANTS, ids=[f"{b}-{n}" for b, n in VARIANTS])
def test_bfloat16_rows_equal_peft_on_a_bfloat16_base(vrefs, base, name):
    """The ends in the model's dtype (trained rows and tables), LoRA on them in float32 cast back, the
    embedding scale where PEFT applies it: on a bfloat16 base, PEFT's own bfloat16 forward bit for bit."""
    from peft import PeftModel

    bf16 = torch.bfloat16
    model = freeze(AutoModelForCausalLM.from_pretrained(BASES[base], dtype=bf16))
    runner, slots = runner_and_slots(model, native=False)  # the layers' LoRA by PEFT's own products (test_precision)
    slots.write(1, parse_folder(VOCAB / base / name, model))
    r = vrefs[base]
    ids = r[f"inputs/{name}"]
    ours = torch.stack(forward(runner, slots, [(ids[b], 1) for b in range(ids.shape[0])]))
    lib_model = AutoModelForCausalLM.from_pretrained(BASES[base], dtype=bf16).eval()
    if size := r[name].shape[-1] if r[name].shape[-1] != 256 else None:
        lib_model.resize_token_embeddings(size)  # as PEFT needs it; the adapter saved the resized tables
    pm = PeftModel.from_pretrained(lib_model, str(VOCAB / base / name)).eval()
    with torch.no_grad():
        lib = torch.cat([pm(ids[b : b + 1]).logits[:, -ids.shape[1] :] for b in range(ids.shape[0])]).float()
    assert torch.equal(ours[..., : lib.shape[-1]], lib)
    assert (torch.log_softmax(lib, -1) - torch.log_softmax(r[name], -1)).abs().max().item() > 1e-3  # bf16 is not float32
