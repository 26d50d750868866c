"""The fixed-shape decode step that CUDA graphs replay: equal to the dynamic step, on every device here.

On the CPU the step runs eagerly (nothing to capture); on CUDA it is captured and replayed. Either way
its shapes are fixed by (batch bucket, KV bucket), rows past the batch are padding, and adapters are
routed by a slot buffer, so these tests prove padding and routing leave every real row exact.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.graphs import batch_buckets
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams
from tests.helpers import Collector, fixture_dir, make_engine, req, run_until_done

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ADAPTERS = ["ia3_default", "ia3_ff_in", "seq_bn", "par_bn", "double_seq_bn", "seq_bn_ln", "par_bn_mh", "seq_bn_tanh_float",
            "seq_bn_sigmoid_noorig", "par_bn_ln_after", "seq_bn_ln_arbln", "hub_ia3",
            "lora_qv", "lora_bias", "lora_patterns", "dora_qv", "dora_rslora_all", "compacter", "hub_lora_all",
            "prompt_tuning", "prefix_tuning", "hub_prefix"]
PROMPTS = ["the quick brown fox", "hello world", "adapters serve many tasks on one", "numbers 0123"]


def engine_on(tmp_path, device: str, graphs: str, name: str):
    e = make_engine(tmp_path / name, slots=len(ADAPTERS), device=torch.device(device), graphs=graphs, max_batch=16)
    for a in ADAPTERS:
        e.registry.add_folder(a, fixture_dir(a))
    return e


def run_mixed(engine, cases, **kw) -> list[GenerationResult]:
    kw = {"max_new_tokens": 10, **kw}
    cols = [Collector() for _ in cases]
    half = len(cases) // 2
    for i in range(half):
        engine.submit(req(engine, i, *cases[i], **kw), cols[i])
    engine.step()
    for i in range(half, len(cases)):  # the rest join one by one while the first half decodes
        engine.submit(req(engine, i, *cases[i], **kw), cols[i])
        engine.step()
    run_until_done(engine, cols)
    return [c.result for c in cols]


def assert_same(cases, want_results, got_results) -> None:
    """The same tokens, and logprobs within 1e-4, case by case."""
    for (a, p), want, r in zip(cases, want_results, got_results, strict=True):
        assert r.token_ids == want.token_ids, (a, p)
        assert max(abs(x - y) for x, y in zip(r.logprobs, want.logprobs, strict=True)) < 1e-4, (a, p)


def triton_kernels(module: str, device: str):  # noqa: ANN201
    """A Triton kernel module where its kernels run on `device`: compiled on CUDA, in the interpreter on a
    machine without CUDA (else the test skips)."""
    mod = pytest.importorskip(module)
    if not mod.available():
        pytest.skip("Triton kernels unavailable here")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("with CUDA the kernels are compiled for it: the interpreter runs them only where there is none")
    return mod


def test_batch_buckets_cover_every_size():
    for n in (1, 3, 8, 17, 32, 64, 100):
        b = batch_buckets(n)
        assert b[-1] == n and b == sorted(set(b)) and all(x <= n for x in b)
        assert all(any(x >= k for x in b) for k in range(1, n + 1))
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]


@pytest.mark.parametrize("device", DEVICES)
def test_graph_step_equals_dynamic_step_in_mixed_continuous_batches(tmp_path, device):
    cases = [(a, p) for a in [None, *ADAPTERS] for p in PROMPTS[:2]]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases)
    e = engine_on(tmp_path, device, "on", "b")
    got = run_mixed(e, cases)
    assert all(r.finish_reason == "length" for r in got)
    assert_same(cases, ref, got)
    g = e.graphs
    assert g is not None
    # every decode step took the fixed-shape step: every family has a static plan
    assert (g.replays if g.capture else g.eager_steps) == e.decode_steps > 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [["lora_qv", "hub_lora_all", "lora_bias"], ["dora_qv", "lora_patterns"],
                                   ["par_bn", "seq_bn_ln", "compacter"], ["seq_bn", "ia3_default", "dora_rslora_all"]])
def test_graph_step_reading_only_the_batchs_distinct_adapters_equals_the_dynamic_step(tmp_path, device, group,
                                                                                      monkeypatch):
    """Few distinct adapters among many slots: the adapter products gather the batch's own blocks
    (`Routing.distinct`) instead of reading every slot's; each row must still get only its own."""
    from server.adapters.methods import Routing
    from server.adapters.methods.lora import LoRAMethod

    monkeypatch.setattr(LoRAMethod, "segment_kernels", False)  # LoRA's routed products, not the segmented kernels
    chose: list[bool] = []
    real = Routing.distinct
    monkeypatch.setattr(Routing, "distinct", lambda self, n: chose.append(real(self, n)) or chose[-1])
    cases = [(a, p) for a in [None, *group] for p in PROMPTS[:2]]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases)
    got = run_mixed(engine_on(tmp_path, device, "on", "b"), cases)
    assert_same(cases, ref, got)
    assert any(chose)  # the distinct-blocks products ran


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dispatch", ["auto", "rows"])
def test_graph_step_with_segmented_lora_kernels_equals_the_dynamic_step(tmp_path, device, dispatch, monkeypatch):
    """LoRA and DoRA rows of several adapters (biases, rsLoRA, other families beside them) decoded by the
    segmented kernels (server/kernels/segments.py; on the CPU in Triton's interpreter) inside the graph
    step, by segments or every row its own: the same tokens as the dynamic step, and the kernels did run."""
    segments = triton_kernels("server.kernels.segments", device)
    from server.adapters.methods.lora import LoRAMethod
    from server.engine.fused import pack_layers

    calls: list[tuple[int, int]] = []  # (rows, sibling modules) of each launch pair
    kernel = "rows" if dispatch == "rows" else "lora"
    real = getattr(segments, kernel)
    monkeypatch.setattr(segments, kernel, lambda *a: calls.append((a[0].shape[0], len(a[1]))) or real(*a))
    monkeypatch.setattr(LoRAMethod, "segment_kernels", True)
    monkeypatch.setattr(LoRAMethod, "segment_dispatch", dispatch)
    group = ["lora_qv", "hub_lora_all", "lora_bias", "dora_qv", "dora_rslora_all", "ia3_default"]
    kw = {}
    if dispatch == "rows":  # a program per row is slow in the interpreter: fewer rows and steps
        group, kw = ["hub_lora_all", "lora_bias", "dora_rslora_all"], {"max_new_tokens": 5}
    cases = [(a, p) for a in [None, *group] for p in PROMPTS[:2]]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases, **kw)
    e = engine_on(tmp_path, device, "on", "b")
    r = e.runner  # q/k/v and gate/up as one product each, as with compiled kernels: siblings share the launches
    r.packed = pack_layers(r.layers, r.arch, r.small.linear)
    got = run_mixed(e, cases, **kw)
    assert_same(cases, ref, got)
    assert max(n for n, _ in calls) > 1 and max(m for _, m in calls) > 1
    assert all(e.slots.methods[m]._segmented.error is None for m in ("lora", "dora"))  # no call fell back


@pytest.mark.parametrize("device", DEVICES)
def test_graph_step_with_segmented_bottleneck_kernels_equals_the_dynamic_step(tmp_path, device, monkeypatch):
    """Bottleneck rows of every placement (seq, parallel, double, Compacter; adapter layer norms before and
    after; several activations) beside LoRA and bare rows, their products by the segmented kernels inside
    the graph step (on the CPU in Triton's interpreter): the same tokens as the dynamic step."""
    segments = triton_kernels("server.kernels.segments", device)
    from server.adapters.methods.bottleneck import BottleneckMethod

    calls: list[int] = []
    real = segments.bottleneck
    monkeypatch.setattr(segments, "bottleneck", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(BottleneckMethod, "segment_kernels", True)
    group = ["seq_bn", "par_bn", "double_seq_bn", "seq_bn_ln", "compacter", "par_bn_ln_after", "seq_bn_tanh_float",
             "lora_qv"]
    cases = [(a, p) for a in [None, *group] for p in PROMPTS[:2]]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases)
    got = run_mixed(engine_on(tmp_path, device, "on", "b"), cases)
    assert_same(cases, ref, got)
    assert calls and max(calls) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_graph_step_with_the_paged_attention_kernel_equals_the_dynamic_step(tmp_path, device, monkeypatch):
    """Decode attention by the Triton kernel reading each row's pages in place (server/kernels/
    paged_attention.py; on the CPU in Triton's interpreter), rows of different lengths joining mid-way,
    prefix-tuned rows with entries before their prompts: the same tokens as the dynamic step without it."""
    paged = triton_kernels("server.kernels.paged_attention", device)
    from server.engine.kv_cache import PagedKVCache

    calls: list[int] = []
    real = paged.decode
    monkeypatch.setattr(paged, "decode", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    group = ["lora_qv", "seq_bn", "prefix_tuning", "hub_prefix"]
    cases = [(a, p) for a in [None, *group] for p in PROMPTS[:2]]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases)
    monkeypatch.setattr(PagedKVCache, "triton_decode", True)
    got = run_mixed(engine_on(tmp_path, device, "on", "b"), cases)
    assert_same(cases, ref, got)
    assert calls and max(calls) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_graph_step_serves_bare_and_ia3_only_batches_and_padding_rows_are_harmless(tmp_path, device):
    """Batches of 3 and 5 rows run in buckets of 4 and 8: the padding rows must not touch real rows."""
    cases = [(a, p) for a in [None, "ia3_default", "ia3_ff_in"] for p in PROMPTS[:2]][:5]
    ref = run_mixed(engine_on(tmp_path, device, "off", "a"), cases)
    e = engine_on(tmp_path, device, "on", "b")
    got = run_mixed(e, cases)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    g = e.graphs
    steps = g.replays if g.capture else g.eager_steps
    assert steps >= 9  # every decode step of these batches went through the fixed-shape step
    if g.capture:
        assert {k[2] for k in g.graphs} >= {(), (("ia3", e.slots.methods["ia3"].layout_version),)}


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_through_the_graph_step(tmp_path, device):
    kw = dict(temperature=1.0, top_p=0.9, top_k=40, seed=11)
    cases = [("ia3_default", PROMPTS[0]), (None, PROMPTS[1]), ("seq_bn", PROMPTS[2])]
    a = run_mixed(engine_on(tmp_path, device, "off", "a"), cases, **kw)
    b = run_mixed(engine_on(tmp_path, device, "on", "b"), cases, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_graph_rows_hold_pages_not_whole_contexts(tmp_path):
    """The fixed-shape step reads pages: rows are bounded by the batch size, not by the pool over a context."""
    from server.config import EngineConfig

    e = make_engine(tmp_path / "s", graphs="on", kv_cache_tokens=2 * 256)
    assert e.max_rows == e.cfg.max_batch_size > e.cfg.kv_cache_tokens // e.max_len
    assert e.runner.cache.k.shape[2] == e.cfg.kv_cache_tokens // e.cfg.kv_page_size + 2  # + the zero page and the sink
    assert EngineConfig().cuda_graphs == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_slot_rewrites_reach_the_graph_step(tmp_path, device):
    """Two device slots, five adapters in turn: slots are evicted and rewritten in place (or the static
    layout rebuilt when a block no longer fits), and every request still equals its dynamic twin."""
    order = ["seq_bn", "ia3_default", "par_bn_mh", "seq_bn_ln", "seq_bn", "double_seq_bn", "hub_ia3", "par_bn",
             "lora_qv", "dora_qv", "lora_all_linear", "lora_patterns", "lora_qv"]

    def run(graphs: str, name: str) -> list[tuple[int, ...]]:
        e = make_engine(tmp_path / name, slots=2, device=torch.device(device), graphs=graphs)
        for a in set(order):
            e.registry.add_folder(a, fixture_dir(a))
        out = []
        for i, a in enumerate(order):
            out += [r.token_ids for r in run_mixed(e, [(a, PROMPTS[i % 4]), (None, PROMPTS[(i + 1) % 4])])]
        return out

    assert run("on", "b") == run("off", "a")


@pytest.mark.parametrize("device", DEVICES)
def test_batches_with_a_family_without_a_static_plan_decode_eagerly_and_exactly(tmp_path, device, monkeypatch):
    """A method without a graph plan (LoRA made so here): its batches take the eager step over the
    same static cache, and every row is still exact."""
    from server.adapters.methods import AdapterMethod
    from server.adapters.methods.lora import LoRAMethod

    monkeypatch.setattr(LoRAMethod, "static_plan", AdapterMethod.static_plan)

    def build(graphs: str, name: str):
        e = make_engine(tmp_path / name, slots=3, device=torch.device(device), graphs=graphs)
        for a in ("lora_qv", "ia3_default", "seq_bn"):
            e.registry.add_folder(a, fixture_dir(a))
        return e

    cases = [("lora_qv", PROMPTS[0]), (None, PROMPTS[1]), ("ia3_default", PROMPTS[2]), ("seq_bn", PROMPTS[3])]
    ref = run_mixed(build("off", "a"), cases)
    e = build("on", "b")
    got = run_mixed(e, cases)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    g = e.graphs
    assert g is not None and (g.replays if g.capture else g.eager_steps) < e.decode_steps


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_a_prefix_row_beside_a_near_full_prompt_fits_the_static_cache(tmp_path, graphs):
    """One prefill of a plain prompt 3 short of the context and a short prompt after 6 virtual tokens:
    each fits alone, so together they must too (only real tokens are written when starts differ)."""
    e = make_engine(tmp_path / "s", slots=4, graphs=graphs)
    e.registry.add_folder("prefix_tuning", fixture_dir("prefix_tuning"))
    tok = e.tokenizer("hello").input_ids[-1]
    reqs = [GenerationRequest("a", (tok,) * (e.max_len - 3), None, SamplingParams(max_new_tokens=3, ignore_eos=True)),
            GenerationRequest("b", (tok,) * 5, "prefix_tuning", SamplingParams(max_new_tokens=3, ignore_eos=True))]
    alone = []
    for r in reqs:
        c = Collector()
        e.submit(r, c)
        run_until_done(e, [c])
        alone.append(c.result)
    cols = [Collector(), Collector()]
    for r, c in zip(reqs, cols, strict=True):
        e.submit(r, c)
    run_until_done(e, cols)
    for c, want in zip(cols, alone, strict=True):
        assert isinstance(c.result, GenerationResult) and c.result.finish_reason == "length"
        assert c.result.token_ids == want.token_ids


def test_slot_layouts_shrink_when_the_widest_adapter_leaves(tmp_path):
    """Every slot of a static layout is padded to the widest block resident: once a rank-32 LoRA is
    evicted for rank-4 ones, the layout (memory, and bytes read per step) follows them down."""
    from server.adapters.methods import write_demo

    e = make_engine(tmp_path / "e", slots=2, graphs="on")
    cfg = e.runner.model.config
    for kind, name in (("lora32", "wide"), ("lora4", "a"), ("lora4", "b")):
        e.registry.add_folder(name, write_demo(kind, tmp_path / name, cfg))
    lora = e.slots.methods["lora"]

    def widths() -> set[int]:
        return {st.R for st in lora.static.current().values()}

    run_mixed(e, [("wide", PROMPTS[0]), ("a", PROMPTS[1])])
    assert widths() == {32}
    run_mixed(e, [("a", PROMPTS[2]), ("b", PROMPTS[3])])  # two slots: "wide" is evicted for "b"
    assert widths() == {4}
