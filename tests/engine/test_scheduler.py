"""Admission policy on its own: pure data in, the admitted requests out (no model, no torch)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.engine.scheduler import Scheduler
from server.engine.sequence import Seq
from server.engine.types import GenerationRequest


def seq(i: int, n: int, new: int = 10, adapter: str | None = None) -> Seq:
    return Seq(GenerationRequest(f"r{i}", tuple(range(1, n + 1)), adapter), sink=lambda ev: None, ref=None,
               stream=None, seed=0, max_new=new, t_arrival=0.0, deadline=1e9, method=None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Need:
    compute: int
    pages: int
    wait: bool = False


class Pool:
    """Pages by count alone: a request takes a page per 16 positions of its context, less what is cached."""

    def __init__(self, pages: int, cached: dict[str, int] | None = None) -> None:
        self.free, self.cached = pages, cached or {}
        self.taken: list[str] = []

    def need(self, s: Seq) -> Need:
        hit = self.cached.get(s.req.request_id, 0)  # tokens found in the prefix cache
        return Need(s.prompt_len - hit, -(-s.context_len // 16) - hit // 16)

    def take(self, s: Seq, need: Need) -> None:
        self.free -= need.pages
        self.taken.append(s.req.request_id)


def sched(rows: int = 4, budget: int = 100, pool: Pool | None = None, patience: int = 32) -> Scheduler:
    p = pool or Pool(10_000)
    return Scheduler(rows, budget, p.need, lambda: p.free, p.take, patience=patience)


def test_first_come_first_served_within_rows_and_budget():
    waiting = deque([seq(0, 40), seq(1, 40), seq(2, 40), seq(3, 5)])
    adm = sched(budget=100).admit(waiting, [], lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0", "r1"] and adm.chunked is None
    assert [s.req.request_id for s in waiting] == ["r2", "r3"]  # r2 does not fit the budget: r3 waits behind it


def test_rows_limit():
    running = [seq(9, 5), seq(8, 5), seq(7, 5)]
    waiting = deque([seq(0, 5), seq(1, 5)])
    adm = sched(rows=4).admit(waiting, running, lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0"] and len(waiting) == 1


def test_a_prompt_over_the_budget_is_chunked_when_first_in_line_only():
    waiting = deque([seq(0, 10), seq(1, 300)])
    adm = sched(budget=100).admit(waiting, [], lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0"] and adm.chunked is None  # r1 goes alone, later
    adm = sched(budget=100).admit(waiting, [], lambda s: True)
    assert adm.joined == [] and adm.chunked is not None and adm.chunked.req.request_id == "r1" and not waiting


def test_admission_asks_for_the_pages_a_context_takes_now_less_what_the_cache_holds():
    pool = Pool(5)
    waiting = deque([seq(0, 40, new=1000), seq(1, 40), seq(2, 20)])  # 3, 3 and 2 pages: what they may reach is not asked
    adm = sched(pool=pool).admit(waiting, [], lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0"] and pool.free == 2  # r1 does not fit: r2 waits behind it
    pool = Pool(5, cached={"r1": 32})  # two of r1's pages are cached: it computes 8 tokens into 1 page
    waiting = deque([seq(0, 40), seq(1, 40)])
    adm = sched(pool=pool).admit(waiting, [], lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0", "r1"] and pool.free == 1 and pool.taken == ["r0", "r1"]


def test_the_budget_counts_the_tokens_a_prefill_computes():
    pool = Pool(10_000, cached={"r1": 32})
    waiting = deque([seq(0, 40), seq(1, 72)])  # 72 tokens, 40 of them to compute: 2 rows x 40 fit the budget of 100
    assert len(sched(budget=100, pool=pool).admit(waiting, [], lambda s: True).joined) == 2


def test_the_budget_counts_the_padding_of_a_right_padded_pass():
    waiting = deque([seq(0, 10), seq(1, 10), seq(2, 60), seq(3, 10)])  # 3 rows x 60 padded tokens > 100
    adm = sched(budget=100).admit(waiting, [], lambda s: True)
    assert [s.req.request_id for s in adm.joined] == ["r0", "r1"] and len(waiting) == 2


def test_a_request_whose_adapter_finds_every_slot_busy_is_passed_over():
    waiting = deque([seq(0, 5, adapter="busy"), seq(1, 5), seq(2, 5, adapter="busy")])
    adm = sched().admit(waiting, [], lambda s: s.req.adapter_id != "busy")
    assert [s.req.request_id for s in adm.joined] == ["r1"]
    assert [s.req.request_id for s in waiting] == ["r0", "r2"]  # they keep their places


def test_a_request_passed_over_too_often_stops_the_line_until_it_fits():
    """A big adapter waits while rows of resident adapters hold the room it needs; new rows of those
    adapters would keep it waiting forever, so after `patience` passes nobody overtakes it."""
    big, small = seq(0, 5, adapter="big"), seq(1, 5, adapter="small")
    waiting = deque([big, small])
    s = sched(patience=3)
    assert [x.req.request_id for x in s.admit(waiting, [], lambda x: x.req.adapter_id != "big").joined] == ["r1"]
    for i in (2,):  # more rows of the resident adapter arrive, and still overtake it
        waiting.append(seq(i, 5, adapter="small"))
        assert [x.req.request_id for x in s.admit(waiting, [], lambda x: x.req.adapter_id != "big").joined] == [f"r{i}"]
    waiting += [seq(9, 5, adapter="small"), seq(10, 5)]
    joined = s.admit(waiting, [], lambda x: x.req.adapter_id != "big").joined
    assert [x.req.request_id for x in joined] == ["r10"]  # adapters wait for it; the bare model needs no room
    assert big.passed_over == 3 and [x.req.request_id for x in waiting] == ["r0", "r9"]
    assert [x.req.request_id for x in s.admit(waiting, [], lambda x: True).joined] == ["r0", "r9"]
    gone = seq(11, 5, adapter="bad")
    waiting = deque([gone])
    s.admit(waiting, [], lambda x: waiting.remove(x) or False)  # the engine ended it: not a pass
    assert gone.passed_over == 0


def test_the_scheduler_and_the_http_layer_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, server.engine.scheduler, server.api.routes, server.api.openai; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
