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
    return {**load_file(FIXTURES / "refs_base.safetensors"), **load_file(FIXTURES / "refs_adapterhub.safetensors")}


def input_ids() -> torch.Tensor:
    from tests.fixtures.make_fixtures import INPUT_IDS

    return INPUT_IDS


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def parse_folder(folder: Path, model: torch.nn.Module) -> AdapterWeights:
    return parse_adapter(folder_files(folder), BaseModelInfo.from_model(model))


def fixture_dir(name: str) -> Path:
    return PEFT_DIR / name if (PEFT_DIR / name).is_dir() else AH_DIR / name


def runner_and_slots(model: torch.nn.Module, num_slots: int = 8, rows: int = 8) -> tuple[ModelRunner, AdapterSlots]:
    return ModelRunner(model, rows, 512), AdapterSlots(model, num_slots, CPU, torch.float32, StepTimer(CPU))


def full_logits(runner: ModelRunner, slots: AdapterSlots, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """Logits [B, T, V] of one prefill over ids with row b routed to row_slots[b]."""
    B, T = ids.shape
    return runner.forward(ids, torch.zeros(B, dtype=torch.long), torch.full((B,), T), 0,
                          slots.plan(row_slots), all_logits=True)
