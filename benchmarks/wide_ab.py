"""The bottleneck native kernel's rule for wide adapters, by the wide adapters' own tokens against by the
whole batch's (`python -m benchmarks.wide_ab 16`): the embedded SmolLM2 in bfloat16, eight adapters of four
families (a width-288 par_bn among them) on a static batch, rounds of bare, the rule by rows, the rule by
batch, interleaved in one process, best of four; prints tok/s and each case's share of bare.
"""

import sys
import tempfile
from pathlib import Path

from benchmarks.bench import PROMPTS, decode_rate, make_engine
from server.adapters.methods import bottleneck, write_demo
from server.config import ModelConfig
from server.engine.model_loader import load_base_model
from server.threads import on_own_thread

kinds = ["ia3", "lora", "dora", "seq_bn", "ia3", "lora", "par_bn", "seq_bn"]
loaded = on_own_thread(lambda: load_base_model(ModelConfig("smollm2", "cpu", "bfloat16", Path(".cache/models"))))
eng = make_engine(loaded, Path(tempfile.mkdtemp()) / "store", merge="never")
src = Path(tempfile.mkdtemp())
for i, kind in enumerate(kinds):
    folder = write_demo(kind, src / f"m{i}", loaded.model.config, seed=i)
    on_own_thread(lambda i=i, folder=folder: eng.registry.add_folder(f"m{i}", folder))
prompts = [eng.tokenizer(p).input_ids for p in PROMPTS]
B = int(sys.argv[1])
rows: list[str | None] = [f"m{i % 8}" for i in range(B)]
bare: list[str | None] = [None] * B
decode_rate(eng, prompts, rows, 5)
decode_rate(eng, prompts, bare, 5)
res: dict[str, list[float]] = {"bare": [], "new": [], "old": []}
for _ in range(4):
    res["bare"].append(decode_rate(eng, prompts, bare, 33))
    bottleneck.WIDE_BY_ROWS = True
    eng.slots._plans.clear()
    res["new"].append(decode_rate(eng, prompts, rows, 33))
    bottleneck.WIDE_BY_ROWS = False
    eng.slots._plans.clear()
    res["old"].append(decode_rate(eng, prompts, rows, 33))
b = max(res["bare"])
print(f"B{B}", {k: round(max(v), 1) for k, v in res.items()}, {k: round(max(v) / b, 3) for k, v in res.items()})  # noqa: T201
