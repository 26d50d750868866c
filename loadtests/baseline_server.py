"""What users write today: a FastAPI server around HF PEFT that activates each request's adapter
and generates one request at a time. Same /generate body as adapter-server (non-streaming).

AdapterHub bottleneck adapters cannot join it: `adapters` needs transformers 4.57, PEFT and the
server run on 5.x. So it serves the base model and PEFT (IA)3 adapters.

    python -m loadtests.baseline_server --model .cache/models/SmolLM2-135M-Instruct \\
        --adapter a=path/to/peft_folder --port 8100
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class Body(BaseModel):
    prompt: str
    adapter_id: str | None = None
    max_new_tokens: int = 128
    ignore_eos: bool = False
    stream: bool = False


def build(model_dir: str, adapters: dict[str, str]) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = base
    for i, (name, path) in enumerate(adapters.items()):
        if i == 0:
            model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
        else:
            model.load_adapter(path, adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: Body) -> dict:
        if body.adapter_id is not None and body.adapter_id not in adapters:
            raise HTTPException(404, f"unknown adapter {body.adapter_id}")
        ids = tok(body.prompt, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        with lock, torch.inference_mode():  # one request at a time: the adapter is global state
            if body.adapter_id is None:
                ctx = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
            else:
                model.set_adapter(body.adapter_id)
                ctx = contextlib.nullcontext()
            with ctx:
                out = model.generate(input_ids=ids, max_new_tokens=body.max_new_tokens, do_sample=False,
                                     min_new_tokens=body.max_new_tokens if body.ignore_eos else 0)
        new = out[0, ids.shape[1]:].tolist()
        return {"text": tok.decode(new, skip_special_tokens=True), "token_ids": new,
                "timings": {"total_seconds": time.perf_counter() - t0}}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", action="append", default=[], help="name=path (PEFT folder)")
    ap.add_argument("--port", type=int, default=8100)
    a = ap.parse_args()
    adapters = dict(x.split("=", 1) for x in a.adapter)
    torch.set_num_threads(torch.get_num_threads())
    uvicorn.run(build(a.model, adapters), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
