"""The bottleneck native kernel's rule for wide adapters, by the wide adapters' own tokens against by the
whole batch's (`python -m benchmarks.wide_ab 16`): the embedded SmolLM2 in bfloat16, eight adapters of four
families (a width-288 par_bn among them) on a static batch, rounds of bare, the rule by rows, the rule by
batch, interleaved in one process, best of four; prints tok/s and each case's share of bare.
"""

import sys

from benchmarks.bench import decode_rate
from benchmarks.native_ab import demo_engine
from server.adapters.methods import bottleneck


def main() -> None:
    eng, prompts = demo_engine(["ia3", "lora", "dora", "seq_bn", "ia3", "lora", "par_bn", "seq_bn"], "bfloat16")
    B = int(sys.argv[1])
    rows: list[str | None] = [f"m{i % 8}" for i in range(B)]
    bare: list[str | None] = [None] * B
    decode_rate(eng, prompts, rows, 5)
    decode_rate(eng, prompts, bare, 5)
    res: dict[str, list[float]] = {"bare": [], "new": [], "old": []}
    for _ in range(4):
        res["bare"].append(decode_rate(eng, prompts, bare, 33))
        for case, by_rows in (("new", True), ("old", False)):
            bottleneck.WIDE_BY_ROWS = by_rows  # read at each site's call
            res[case].append(decode_rate(eng, prompts, rows, 33))
    bottleneck.WIDE_BY_ROWS = True
    b = max(res["bare"])
    print(f"B{B}", {k: round(max(v), 1) for k, v in res.items()},  # noqa: T201
          {k: round(max(v) / b, 3) for k, v in res.items()})


if __name__ == "__main__":
    main()
