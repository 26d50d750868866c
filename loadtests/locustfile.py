"""Locust scenario for people who prefer Locust (`pip install locust`, then
`locust -f loadtests/locustfile.py --host http://127.0.0.1:8000`).

Set ADAPTERS=a,b,c (ids, 'none' for the base model) and ZIPF=1 for Zipf popularity.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

ADAPTERS = [None if a in ("", "none") else a for a in os.environ.get("ADAPTERS", "none").split(",")]
WEIGHTS = [1.0 / (i + 1) for i in range(len(ADAPTERS))] if os.environ.get("ZIPF") else None
WORDS = ["the", "model", "serves", "many", "adapters", "on", "one", "frozen", "base", "while", "requests", "share", "every", "forward", "pass"]


class AdapterUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task
    def generate(self) -> None:
        adapter = random.choices(ADAPTERS, WEIGHTS)[0]
        body = {"prompt": " ".join(random.choices(WORDS, k=random.randint(8, 48))), "adapter_id": adapter,
                "max_new_tokens": random.randint(16, 64), "ignore_eos": True}
        with self.client.post("/generate", json=body, name=f"/generate [{adapter or 'base'}]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(r.text[:200])
