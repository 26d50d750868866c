"""Every Prometheus metric (prefix adapter_server_, base units, bounded labels) and its record helpers.

Labels are closed sets: adapter_type is one of the labels the engine declares (none, each method, each
mergeable method folded: `methods.ADAPTER_TYPES`), never an adapter id or prompt. The one exception is vLLM's `vllm:lora_requests_info`, whose
labels are adapter ids by that protocol's definition: it holds one series, the current one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "adapter_server_"
        self.requests = Counter(p + "requests_total", "Finished generation requests", ["adapter_type", "status"], registry=r)
        self.duration = Histogram(p + "request_duration_seconds", "Request latency, arrival to last token",
                                  ["adapter_type"], buckets=LATENCY, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first generated token",
                              ["adapter_type"], buckets=LATENCY, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per output token after the first",
                              ["adapter_type"], buckets=PER_TOKEN, registry=r)
        self.forward = Counter(p + "forward_seconds_total", "Seconds spent in forward passes", registry=r)
        self.adapter_compute = Counter(p + "adapter_compute_seconds_total",
                                       "Seconds of forward passes spent computing adapters", ["adapter_type"], registry=r)
        self.batch_size = Histogram(p + "batch_size", "Rows per forward pass", buckets=SIZES, registry=r)
        self.distinct = Histogram(p + "distinct_adapters_per_batch", "Distinct adapters (none counts) per forward pass",
                                  buckets=SIZES, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a place in the batch", registry=r)
        self.adapters = Gauge(p + "adapters", "Adapters per tier", ["tier"], registry=r)
        self.cache = Counter(p + "adapter_cache_total", "Adapter cache events", ["event"], registry=r)
        self.load = Histogram(p + "adapter_load_seconds", "Adapter load time by source", ["source"],
                              buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=r)
        self.tokens = Counter(p + "generated_tokens_total", "Generated tokens", ["adapter_type"], registry=r)
        self.kv_bytes = Gauge(p + "kv_cache_bytes", "Bytes held by the KV cache", registry=r)
        self.adapter_device_bytes = Gauge(p + "adapter_device_bytes", "Bytes of adapter weights on the device, and of the base weights a folded adapter keeps to unfold", registry=r)
        # vLLM's names, with the meanings the gateways that route by them read (README, Scale out)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests queued, not yet in the batch", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the batch (prefilling or decoding)",
                                  registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc",
                                   "Fraction (0 to 1) of the KV cache's pages held by requests in the batch", registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Rows preempted when the KV cache's pages ran out "
                                   "(resumed later by prefilling again)", registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.vllm_lora = Gauge("vllm:lora_requests_info", "Adapters of the requests in the batch and in the queue "
                               "(value: when this was last set, unix seconds)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self._lora_info: tuple[str, str, str] | None = None
        self.declare_adapter_types(("none",))
        for e in ("hit", "miss", "evict"):
            self.cache.labels(e)
        for tier in ("device", "host", "disk"):
            self.adapters.labels(tier).set(0)

    def declare_adapter_types(self, types: Iterable[str]) -> None:
        """Create every series of these labels now, so rates and ratios are defined from the start."""
        for t in types:
            self.adapter_compute.labels(t)
            for s in ("ok", "error", "cancelled"):
                self.requests.labels(t, s)

    def set_tiers(self, counts: dict[str, int]) -> None:
        for tier, n in counts.items():
            self.adapters.labels(tier).set(n)

    def set_lora_info(self, max_lora: int, running: list[str], waiting: list[str]) -> None:
        """One series at a time (vLLM's own labels carry adapter ids; keeping only the current set keeps
        the cardinality at one)."""
        key = (str(max_lora), ",".join(running), ",".join(waiting))
        if key != self._lora_info:  # the new series first, then the old one goes: a scrape never sees none
            old, self._lora_info = self._lora_info, key
            self.vllm_lora.labels(*key).set(time.time())
            if old is not None:
                self.vllm_lora.remove(*old)

    def render(self) -> bytes:
        return generate_latest(self.registry)
