"""What inductor does for a batch-1 decode step on the CPU (`python -m benchmarks.compile_step eager|compile|freeze`,
one way per process): the embedded SmolLM2 in bfloat16 through transformers with a static KV cache, 64
greedy steps after three warm ones, eagerly, through `torch.compile` (inductor), and through inductor with
freezing and its C++ wrapper. The ceiling on what compiling our fixed-shape step could give (issue 25):
the same model, none of our routing or paging.
"""

import sys
import time
from pathlib import Path

import torch
from transformers import StaticCache

from server.config import ModelConfig
from server.engine.model_loader import load_base_model
from server.threads import on_own_thread

torch.set_num_threads(2)
loaded = on_own_thread(lambda: load_base_model(ModelConfig("smollm2", "cpu", "bfloat16", Path(".cache/models"))))
model = loaded.model.eval()
steps = 64

def run(fwd, label):
    cache = StaticCache(config=model.config, max_cache_len=256)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(3):  # warm (compiles)
            t0 = time.perf_counter()
            o = fwd(tok, cache, torch.tensor([4 + i]))
            if i == 0:
                print(label, "first call s", round(time.perf_counter() - t0, 1), flush=True)  # noqa: T201
            tok = o.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for i in range(steps):
            o = fwd(tok, cache, torch.tensor([7 + i]))
            tok = o.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    print(label, f"{steps / dt:.1f} tok/s", flush=True)  # noqa: T201

def eager(tok, cache, pos):
    return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)

which = sys.argv[1]
if which == "eager":
    run(eager, "eager")
elif which == "compile":
    run(torch.compile(eager, fullgraph=False), "inductor")
elif which == "freeze":
    import torch._inductor.config as ic
    ic.freezing = True
    ic.cpp_wrapper = True
    run(torch.compile(eager, fullgraph=False), "inductor+freezing+cpp_wrapper")
