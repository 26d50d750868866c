"""Shared test helpers: the tiny fixture model, a tokenizer built in code, adapter folders."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from server.adapters.formats import parse_adapter
from server.adapters.methods import StepTimer
from server.adapters.slots import AdapterSlots
from server.adapters.spec import AdapterWeights, BaseModelInfo
from server.engine.model_loader import freeze
from server.engine.model_runner import ModelRunner

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_llama"
PEFT_DIR = FIXTURES / "peft"
AH_DIR = FIXTURES / "adapterhub"
CPU = torch.device("cpu")


def tiny_model() -> torch.nn.Module:
    return freeze(LlamaForCausalLM.from_pretrained(TINY))


def refs() -> dict[str, torch.Tensor]:
    return {**load_file(FIXTURES / "refs_base.safetensors"), **load_file(FIXTURES / "refs_lora.safetensors"),
            **load_file(FIXTURES / "refs_adapterhub.safetensors"), **load_file(FIXTURES / "refs_adapterhub_lora.safetensors"),
            **load_file(FIXTURES / "refs_prompt.safetensors"), **load_file(FIXTURES / "refs_adapterhub_prefix.safetensors")}


def input_ids() -> torch.Tensor:
    from tests.fixtures.make_fixtures import INPUT_IDS

    return INPUT_IDS


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def parse_folder(folder: Path, model: torch.nn.Module) -> AdapterWeights:
    return parse_adapter(folder_files(folder), BaseModelInfo.from_model(model))


def fixture_dir(name: str) -> Path:
    return PEFT_DIR / name if (PEFT_DIR / name).is_dir() else AH_DIR / name


def runner_and_slots(model: torch.nn.Module, num_slots: int = 8, rows: int = 8, native: bool = True
                     ) -> tuple[ModelRunner, AdapterSlots]:
    """A runner and slots on the model's device, in its dtype (`native`: the CPU kernels where they serve)."""
    runner = ModelRunner(model, rows, 512, native=native)
    dev = runner.device
    return runner, AdapterSlots(model, num_slots, dev, runner.dtype, StepTimer(dev), encode=runner.prefix_kv,
                                native=native)


def full_logits(runner: ModelRunner, slots: AdapterSlots, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """Logits [B, T, V] of one prefill over ids with row b routed to row_slots[b], each row after its
    adapter's KV prefix if it has one (as the engine's prefill places it)."""
    B, T = ids.shape
    prefixes = [slots.prefix(s) for s in row_slots]
    starts = [0 if p is None else p.length for p in prefixes]
    for b, p in enumerate(prefixes):
        if p is not None:
            runner.write_prefix(b, p.keys, p.values)
    shifts = [0 if p is None else p.rope_shift for p in prefixes]
    dev = runner.device
    return runner.forward(ids.to(dev), start=torch.tensor(starts, device=dev), lengths=torch.full((B,), T, device=dev),
                          row0=0, plan=slots.plan(row_slots), all_logits=True,
                          rope_shift=torch.tensor(shifts, device=dev) if any(shifts) else None)


CORPUS = (
    "the quick brown fox jumps over the lazy dog. adapters serve many tasks on one frozen model. "
    "hello world, this is a tiny tokenizer for tests: numbers 0123456789 and symbols !?;()[]{}<>=+-*/'\"#%&@_|~^$`\\"
)


def our_logits(model, name: str | None, device, dtype, native: bool = True) -> torch.Tensor:  # noqa: ANN001
    """Logits [B, T, V] of the fixture inputs through our runner on the model's device (after the
    adapter's KV prefix, for prompt and prefix tuning, as the engine places it)."""
    runner, slots = runner_and_slots(model, 4, 4, native)
    assert runner.device.type == torch.device(device).type and runner.dtype == dtype
    if name is not None:
        slots.write(1, parse_folder(fixture_dir(name), model))
    ids = input_ids()
    return full_logits(runner, slots, ids, [1 if name else 0] * ids.shape[0]).cpu()


def peft_logits(model, name: str) -> torch.Tensor:  # noqa: ANN001
    """PEFT's own forward on `model` (which it wraps in place); prompt learning one row at a time (PEFT
    is not pad-aware there), at the real tokens only, as the references were made (make_fixtures.py)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(fixture_dir(name))).eval()
    ids = input_ids().to(next(model.parameters()).device)
    with torch.inference_mode():
        if not pm.peft_config["default"].is_prompt_learning:
            return pm(ids).logits.float().cpu()
        return torch.cat([pm(ids[b : b + 1]).logits[:, -ids.shape[1] :] for b in range(ids.shape[0])]).float().cpu()


def tiny_tokenizer(vocab_size: int = 256):
    """A Metaspace BPE tokenizer trained in code to exactly `vocab_size` ids; <s>=1, </s>=2."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable.strip()) + ["▁"], show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_engine(store_dir: Path, *, slots: int = 8, max_batch: int = 16, merge: str = "auto", host: int = 64,
                max_queue: int = 256, model: torch.nn.Module | None = None, metrics=None,
                device: torch.device = CPU, dtype: torch.dtype = torch.float32, graphs: str = "off",
                budget: int = 4096, kv_cache_tokens: int = 0, prefix_caching: str = "on", page_size: int = 16):
    """An engine over the tiny fixture model, not started: tests drive it with engine.step().

    `graphs="on"` runs decode through the fixed-shape graph step (captured on CUDA, eager on the CPU).
    `kv_cache_tokens` (default: room for every row at a whole context) sizes the page pool.
    """
    from server.adapters.registry import Events, Registry
    from server.adapters.store import AdapterStore
    from server.config import EngineConfig, RegistryConfig
    from server.engine.engine import Engine
    from server.engine.model_loader import LoadedModel
    from server.metrics import Metrics

    model = (model or tiny_model()).to(device=device, dtype=dtype)
    metrics = metrics or Metrics()
    rcfg = RegistryConfig(host_capacity=host)
    events = Events.for_metrics(metrics)
    registry = Registry(AdapterStore(store_dir), BaseModelInfo.from_model(model), rcfg, events)
    registry.scan()
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny-llama", device, dtype)
    ecfg = EngineConfig(max_batch_size=max_batch, max_model_len=256, max_new_tokens_limit=200, merge_policy=merge,  # type: ignore[arg-type]
                        merge_after_steps=2, max_queue=max_queue, cuda_graphs=graphs,  # type: ignore[arg-type]
                        kv_cache_tokens=kv_cache_tokens or max(65536, 256 * max_batch), prefill_token_budget=budget,
                        kv_page_size=page_size, prefix_caching=prefix_caching,  # type: ignore[arg-type]
                        device_slots=slots)
    return Engine(loaded, registry, ecfg, metrics)


class Collector:
    """A sink that keeps every event of one request."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, ev) -> None:  # noqa: ANN001
        self.events.append(ev)

    @property
    def result(self):  # noqa: ANN201
        from server.engine.types import GenerationResult

        done = [e for e in self.events if isinstance(e, (GenerationResult, Exception))]
        return done[-1] if done else None


def run_until_done(engine, collectors: list[Collector], max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if all(c.result is not None for c in collectors):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def req(engine, i: int, adapter: str | None, prompt: str, **kw):  # noqa: ANN001, ANN003, ANN201
    """Request "r{i}": the prompt through the engine's tokenizer, 12 new tokens without stopping at EOS,
    with logprobs; `kw` overrides any sampling field."""
    from server.engine.types import GenerationRequest, SamplingParams

    p = SamplingParams(**{"max_new_tokens": 12, "ignore_eos": True, "logprobs": True, **kw})
    return GenerationRequest(f"r{i}", tuple(engine.tokenizer(prompt).input_ids), adapter, p)


def solo(engine, r):  # noqa: ANN001, ANN201
    """Run one request alone to its end; its result."""
    c = Collector()
    engine.submit(r, c)
    run_until_done(engine, [c])
    return c.result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a chat template for the tiny model's tokenizer, which has none
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def openai_client(server: LiveServer):  # noqa: ANN201
    """The OpenAI SDK pointed at a live server's /v1, never retrying (a retry would hide an error)."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def lora_server(store: Path, **overrides) -> LiveServer:  # noqa: ANN003
    """A live server of the tiny model holding the PEFT LoRA fixture as "lo", with a chat template."""
    import httpx

    s = LiveServer(store, **overrides)
    assert httpx.post(s.url + "/adapters", data={"adapter_id": "lo"}, files=upload_files(fixture_dir("lora_qv"))).status_code == 201
    s.services.generation.tokenizer.chat_template = CHAT_TEMPLATE
    return s


class LiveServer:
    """The real app under uvicorn on 127.0.0.1 in a background thread; stopped by `close()`."""

    def __init__(self, store: Path, **overrides) -> None:  # noqa: ANN003
        import threading

        import uvicorn

        from server.config import Settings
        from server.main import create_app

        self.port = free_port()
        # float32: the tests compare tokens across batch compositions and servers, and with the engine's
        # float32 references; bfloat16 (--dtype auto on a CPU that computes it) rounds differently per shape
        kw = dict(model=str(TINY), store=store, host="127.0.0.1", port=self.port, device="cpu", dtype="float32",
                  max_new_tokens_limit=64, max_batch_size=32, device_slots=8)
        kw.update(overrides)
        self.settings = Settings(**kw)
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time

        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become healthy")

    @property
    def services(self):  # noqa: ANN201
        return self.app.state.services

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def upload_files(folder: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir()) if p.is_file()]


def sse_events(resp) -> list:  # noqa: ANN001
    """The events of a text/event-stream body, parsed as the OpenAI API frames them and vLLM's load generator
    (`vllm bench serve`) reads them: events separated by a blank line (`\n\n`), each one `data: ` line of
    JSON, or the final `[DONE]`. A `\r`, a comment line (a `: ping` keep-alive) or any other field fails."""
    import json

    body = "".join(resp.iter_text())
    assert "\r" not in body and body.endswith("\n\n"), body[-200:]
    out = []
    for ev in body.split("\n\n")[:-1]:
        assert ev.startswith("data: ") and "\n" not in ev, ev
        data = ev[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
