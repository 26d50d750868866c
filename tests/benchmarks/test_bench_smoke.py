"""The benchmarks, each one's main path once, end to end, on the tiny fixture model with the smallest
sizes, on the CPU. They drive engine internals (the runner, the slots, the graphs), so an engine change
that breaks one fails here instead of the next time someone benchmarks. Numbers are not checked, only
that each benchmark produced them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CHAT_TEMPLATE, TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cpu_and_global_state(monkeypatch):
    """The GPU benchmark's device pinned to the CPU (on a CUDA machine it would compile kernels for
    minutes); one torch thread (the numbers are not checked, and on a busy machine a second thread
    waiting for a core makes every small product several times slower); grad mode and the root
    logger's level, which the benchmarks set, restored afterwards."""
    from benchmarks import gpu

    monkeypatch.setattr(gpu, "DEV", torch.device("cpu"))
    grad, level, threads = torch.is_grad_enabled(), logging.getLogger().level, torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    logging.getLogger().setLevel(level)


def test_bench(tmp_path, monkeypatch, capsys):
    from benchmarks import bench

    load = bench.load_base_model

    def with_template(cfg):  # the tiny tokenizer has no chat template; the benchmark applies one
        loaded = load(cfg)
        loaded.tokenizer.chat_template = CHAT_TEMPLATE
        return loaded

    monkeypatch.setattr(bench, "load_base_model", with_template)
    out = tmp_path / "bench.json"
    bench.main(["--model", str(TINY), "--max-new", "2", "--repeats", "1", "--steps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["model"] == TINY.name and r["max_new_tokens"] == 2
    assert r["command"].startswith("make bench  (python -m benchmarks.bench --model")
    assert set(r["flops_share"]) == {"seq_bn", "double_seq_bn", "par_bn", "compacter", "lora r16 (unmerged)"}
    kinds = {"ia3 (unmerged)", "seq_bn", "double_seq_bn", "par_bn", "lora r16 (unmerged)", "dora r16 (unmerged)",
             "prompt 20", "prefix 20", "compacter", "ia3 (merged)", "lora r16 (merged)", "dora r16 (merged)",
             "trained rows 16", "trained LM head"}
    assert [row["batch"] for row in r["decode"]["per_kind"]] == [1, 16]
    for row in r["decode"]["per_kind"]:
        assert row["base_s"] > 0 and row["matmul_floor_s"] > 0 and set(row["overhead"]) == kinds
    assert len(r["decode"]["mixed"]) == 8 and all(m["step_s"] > 0 for m in r["decode"]["mixed"])
    assert len(r["decode"]["mixed_lora"]) == 5 and all(m["step_s"] > 0 for m in r["decode"]["mixed_lora"])
    assert [c["kind"] for c in r["cold_start"]] == ["ia3", "seq_bn", "par_bn"]
    assert all(c["upload_s"] > 0 and c["upload_to_first_token_s"] > 0 for c in r["cold_start"])
    assert len(r["throughput"]) == 8 and all(t["tokens_per_s"] > 0 for t in r["throughput"])
    printed = capsys.readouterr().out
    assert "Adapter overhead per decode step" in printed and f"wrote {out}" in printed


def test_sampling(tmp_path, capsys):
    from benchmarks import sampling

    out = tmp_path / "sampling.json"
    sampling.main(["--model", str(TINY), "--rounds", "1", "--batch", "2", "--new", "12", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["batch"] == 2 and r["command"].startswith("python -m benchmarks.sampling --model")
    assert list(r["median_step_ms"]) == list(sampling.CASES)
    assert all(n > 0 for n in r["steps_per_case"].values())
    assert all(ms > 0 for ms in r["median_step_ms"].values())
    assert set(r["overhead"]) == set(sampling.CASES) - {"plain"}
    printed = capsys.readouterr().out
    assert all(k in printed for k in sampling.CASES), printed


def test_gpu_benchmark_on_the_cpu(tmp_path, capsys):
    """The CPU path of the GPU benchmark on its "tiny" shapes: the fixed-shape graph step runs eagerly
    there; the CUDA-only parts (kernel profiles, graph replays, GPU memory) are skipped by the benchmark."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--models", "tiny", "--batches", "1,2", "--prompt", "8", "--new", "4", "--adapter-batch", "2",
                     "--zipf", "4,8", "--zipf-model", "tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["copy_bandwidth_gb_s"] > 0
    (m,) = r["models"]
    assert m["model"] == "tiny" and "graphs_captured" in m and "fused_failed" not in m
    assert [row["batch"] for row in m["rows"]] == [1, 2]
    for row in m["rows"]:
        for k in ("graphs_tok_s", "graphs_unfused_tok_s", "eager_tok_s", "floor_tok_s"):
            assert row[k] > 0, k
        # HF generate's rate is a difference of two short runs' times: on a loaded machine it can come out negative
        assert isinstance(row["hf_generate_tok_s"], float) and row["hf_generate_tok_s"] == row["hf_generate_tok_s"]
    assert len(m["adapters_tok_s"]) == 13 * 3  # every case under graphs, graphs with eager hooks, eager
    assert all(v > 0 for v in m["adapters_tok_s"].values())
    assert set(m["adapter_params_share"]) == {"ia3", "seq_bn", "lora", "lora_mixed", "dora", "par_bn", "double_seq_bn"}
    z = m["zipf"]
    assert z["all_hot"]["ok"] == z["slots_16"]["ok"] == 8 and z["all_hot"]["tok_s"] > 0
    assert json.loads(capsys.readouterr().out) == r


def test_precision(tmp_path, monkeypatch, capsys):
    """Every configuration but llama.cpp (skipped by its flag: llama-cpp-python is not installed for the
    tests), each child run in this process instead of its own (a child is seconds of imports)."""
    from benchmarks import precision

    calls: list[tuple[list[str], dict[str, str]]] = []

    def run_in_process(cmd: list[str], **kw) -> subprocess.CompletedProcess:
        assert cmd[:3] == [sys.executable, "-m", "benchmarks.precision"] and "--child" in cmd
        calls.append((cmd, kw["env"]))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            precision.main(cmd[3:])
        return subprocess.CompletedProcess(cmd, 0, buf.getvalue(), "")

    monkeypatch.setattr(precision, "subprocess", type("Subprocess", (), {"run": staticmethod(run_in_process)}))
    out = tmp_path / "precision.json"
    precision.main(["--model", str(TINY), "--batches", "1,2", "--new", "5", "--memory-batches", "4",
                    "--memory-every", "2", "--no-llama-cpp", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python -m benchmarks.precision --model")
    assert list(r["runs"]) == ["float32", "bfloat16", "int8", "int4", "memory float32", "memory bfloat16"]
    for name in ("float32", "bfloat16", "int8", "int4"):
        run = r["runs"][name]
        assert "error" not in run and run["weights_mb"] > 0
        for label in ("bare", "8 mixed adapters"):
            rates = run[f"decode_tok_s ({label})"]
            assert list(rates) == ["1", "2"] and all(v > 0 for v in rates.values())
        assert "logprobs" not in run and run["drift_from_float32"]["positions"] > 0
    assert r["runs"]["float32"]["drift_from_float32"]["greedy_agreement"] == 1.0
    for name in ("memory float32", "memory bfloat16"):
        assert [it for it, _ in r["runs"][name]["rss_mb"]] == [2, 4]
    assert "drift from float32" in capsys.readouterr().out
    # a real child finds the (uninstalled) benchmarks package from any directory, with the env it is given
    env = calls[0][1]
    p = subprocess.run([sys.executable, "-m", "benchmarks.precision", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "--no-llama-cpp" in p.stdout, p.stderr


def test_runner_ab_against_this_commit():
    """The A/B runner benchmark imports another commit's server package beside this one (HEAD here) and
    times both on one model; on the tiny model, a few steps."""
    from benchmarks import runner_ab

    out = runner_ab.main(["--rev", "HEAD", "--model", str(TINY), "--batches", "1,2", "--steps", "8", "--prompt", "4",
                          "--threads", "1"])
    assert set(out) == {"1", "2"} and all(v["base_ms"] > 0 and v["this_ms"] > 0 for v in out.values())


def test_gpu_lora(tmp_path, monkeypatch):
    """The segmented kernels' GPU benchmark, its engine stage for the bottleneck family: on the CPU its kernels
    run in Triton's interpreter (the kernels-alone stage needs CUDA graphs and is skipped)."""
    segments = pytest.importorskip("server.kernels.segments")
    if not segments.available() or torch.cuda.is_available():
        pytest.skip("runs where the kernels run in Triton's interpreter")
    from benchmarks import gpu_lora

    monkeypatch.setattr(gpu_lora, "DEV", torch.device("cpu"))
    out = tmp_path / "gpu_lora.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gpu_lora.main(["--models", "tiny", "--families", "bottleneck", "--batch", "2", "--prompt", "8", "--new", "6",
                       "--out", str(out)])
    r = json.loads(out.read_text())["models"]["tiny bottleneck"]
    assert set(r["tok_s"]) == {"bare", "seq_bn x1", "seq_bn x8 mixed", "par_bn x1", "double_seq_bn x1"}
    assert all(set(v) == {"segmented", "routed"} and min(v.values()) > 0 for v in r["tok_s"].values())
