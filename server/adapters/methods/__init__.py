"""Adapter methods: each owns its device slot storage and builds a per-batch plan. One file per method."""

from __future__ import annotations

from .base import AdapterMethod, MethodPlan, StepTimer
from .bottleneck import BottleneckMethod
from .ia3 import IA3Method

METHODS: dict[str, type[AdapterMethod]] = {"ia3": IA3Method, "bottleneck": BottleneckMethod}

__all__ = ["METHODS", "AdapterMethod", "MethodPlan", "StepTimer"]
