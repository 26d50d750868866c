"""Adapter methods: each owns its device slot storage and builds a per-batch plan. One file per method.

How methods compose in one batch (`slots.BatchPlan`), in the order of METHODS:
- at every Linear, each method may change the input (`linear_in`: input scales), then the base product
  runs once on the result, then each method may change the output (`linear_out`: output scales, then
  additive terms computed from the original input). So (IA)3, LoRA and DoRA on one Linear all apply;
- at every sub-block's residual add, each method may compute the sub-block's output (`residual`);
  where several do, each row takes its own method's (`residual_rows`);
- on rows it does not serve, every hook is exactly the identity, so a row's result does not depend on
  which other methods share its batch;
- a method may instead give a row key/value entries that its KV cache holds before its prompt
  (`prefix`: prompt, P- and prefix tuning); the engine copies them in when the row is admitted.
"""

from __future__ import annotations

from .. import families
from .base import AdapterMethod, MethodPlan, Routing, StepTimer
from .bottleneck import BottleneckMethod
from .ia3 import IA3Method
from .lora import DoRAMethod, LoRAMethod
from .prefix import PrefixMethod, PromptMethod

METHODS: dict[str, type[AdapterMethod]] = {
    m.name: m for m in (IA3Method, BottleneckMethod, LoRAMethod, DoRAMethod, PromptMethod, PrefixMethod)}
assert tuple(METHODS) == families.METHODS, "families.METHODS lists the methods, in this order"

__all__ = ["METHODS", "AdapterMethod", "MethodPlan", "Routing", "StepTimer"]
