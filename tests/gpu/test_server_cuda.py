"""The whole server on CUDA: upload, generate (greedy, seeded sampling, streamed) with graphs replayed."""

from __future__ import annotations

import httpx

from tests.helpers import LiveServer, fixture_dir, sse_events, upload_files


def test_server_on_cuda_serves_adapters_with_graphs(tmp_path):
    srv = LiveServer(tmp_path / "store", device="cuda", dtype="bfloat16")
    try:
        for name in ("ia3_default", "seq_bn"):
            r = httpx.post(srv.url + "/adapters", data={"adapter_id": name}, files=upload_files(fixture_dir(name)), timeout=60)
            assert r.status_code == 201, r.text
        outs = {}
        for a in (None, "ia3_default", "seq_bn"):
            body = {"prompt": "the quick brown fox", "max_new_tokens": 8, "ignore_eos": True, "adapter_id": a}
            r = httpx.post(srv.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            outs[a] = r.json()["token_ids"]
            seeded = [httpx.post(srv.url + "/generate", json={**body, "temperature": 1.0, "seed": 5}, timeout=60).json()["token_ids"]
                      for _ in range(2)]
            assert seeded[0] == seeded[1]
        assert len({tuple(v) for v in outs.values()}) > 1
        with httpx.stream("POST", srv.url + "/generate", json={"prompt": "hello", "max_new_tokens": 5, "stream": True,
                                                                "adapter_id": "seq_bn", "ignore_eos": True}, timeout=60) as resp:
            events = sse_events(resp)
        assert events[-1] == "[DONE]" and len(events) >= 6
        engine = srv.services.engine
        assert engine.graphs is not None and engine.graphs.replays > 0
    finally:
        srv.close()
