"""The cluster's `/metrics`: every replica's families merged into cluster-wide series, and each
replica's own series under a `replica` label (bounded: one value per live replica).

Replicas push their exposition text to one small Ray actor every second; the ingress reads what is
fresh (a dead replica's text ages out) and merges: counters, histograms and gauges are summed, except
`vllm:kv_cache_usage_perc` (a fraction: averaged) and `vllm:lora_requests_info` (per replica only).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families

HUB = "adapter-server-metrics"
PUSH_PERIOD_S = 1.0
FRESH_S = 10.0
MEAN = {"vllm:kv_cache_usage_perc"}
PER_REPLICA_ONLY = {"vllm:lora_requests_info"}


@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest exposition text of each replica, with when it came."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.time(), text)

    def fresh(self, max_age_s: float) -> dict[str, str]:
        now = time.time()
        return {r: t for r, (ts, t) in self.texts.items() if now - ts <= max_age_s}


def hub() -> Any:
    """The cluster's one hub (created by whoever asks first; it outlives a replica that dies)."""
    cls: Any = MetricsHub
    return cls.options(name=HUB, get_if_exists=True, lifetime="detached").remote()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def merge(texts: dict[str, str]) -> str:
    """One exposition text from each replica's (replica id -> text)."""
    kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help), in first-seen order
    total: dict[str, dict[tuple, float]] = defaultdict(dict)
    count: dict[str, dict[tuple, int]] = defaultdict(dict)
    per: dict[str, list[tuple[str, dict[str, str], float]]] = defaultdict(list)
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created"):
                continue
            kinds.setdefault(fam.name, (fam.type, fam.documentation))
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                per[fam.name].append((s.name, {**s.labels, "replica": replica}, s.value))
                if fam.name not in PER_REPLICA_ONLY:
                    key = (s.name, tuple(s.labels.items()))
                    total[fam.name][key] = total[fam.name].get(key, 0.0) + s.value
                    count[fam.name][key] = count[fam.name].get(key, 0) + 1
    out = []
    for name, (typ, doc) in kinds.items():
        head = name + "_total" if typ == "counter" else name  # the text format names a counter by its sample
        out += [f"# HELP {head} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}", f"# TYPE {head} {typ}"]
        for (sample, labels), v in total[name].items():
            value = v / count[name][(sample, labels)] if name in MEAN else v
            out.append(f"{sample}{_labels(dict(labels))} {value!r}")
        out += [f"{sample}{_labels(labels)} {v!r}" for sample, labels, v in per[name]]
    return "\n".join(out) + "\n"
