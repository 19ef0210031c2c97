"""The web view over real HTTP (Hypercorn on a loopback port), on asyncio and trio:
every page and its JSON twin, pagination, lineage, tokens, tenants, live progress."""

from __future__ import annotations

import json
import re
from datetime import date

import anyio
import httpx
import pytest
from waiting import until

import flowstone as fs
from flowstone.web.app import create_app
from flowstone.web.server import serve

pytestmark = pytest.mark.anyio

DAYS = fs.DailyPartitions(start=date(2026, 1, 1), end=date(2026, 1, 10))


def pipeline(gate: anyio.Event | None = None) -> fs.Pipeline:
    p = fs.Pipeline("web")

    @p.asset(partitioned_by=DAYS, code_version="1")
    async def raw(ctx, deps):
        if ctx.partition_key == "2026-01-04":
            raise ValueError("bad file on the 4th")
        if gate is not None and ctx.partition_key >= "2026-01-06":
            await gate.wait()
        return ctx.partition.day

    @p.asset(depends_on=["raw"], partitioned_by=DAYS, code_version="1", automation=fs.Eager())
    async def clean(ctx, deps):
        return deps["raw"] * 10

    @p.asset(depends_on=["clean"], code_version="1")
    async def report(ctx, deps):
        """The month in one number."""
        return sum(deps["clean"].values())

    p.schedule("report", "0 6 * * *")
    return p


class Server:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=url, headers=headers, timeout=30)

    async def json(self, path: str) -> dict:
        answer = await self.client.get(path)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def html(self, path: str) -> str:
        answer = await self.client.get(path)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/html")
        return answer.text


async def _serving(tasks, store, p, stop, **options) -> Server:
    app = create_app(store, p, stopping=stop, **options)
    url = await tasks.start(lambda task_status: serve(app, port=0, stopping=stop, task_status=task_status))
    return Server(url, options.get("token"))


async def _filled(rt) -> None:
    for day in DAYS.keys(date(2026, 1, 1), date(2026, 1, 5)):
        try:
            await rt.materialize("clean", day)
        except fs.MaterializationFailed:
            pass  # the 4th fails: a failed partition to show


async def test_pages_and_their_json_twins(anyio_backend):
    p, stop = pipeline(), anyio.Event()
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        await _filled(rt)
        async with anyio.create_task_group() as tasks:
            server = await _serving(tasks, store, p, stop)
            graph = await server.json("/api/graph")
            assert graph["layers"] == [["raw"], ["clean"], ["report"]]
            assert graph["edges"] == [["raw", "clean"], ["clean", "report"]]
            page = await server.html("/")
            assert "<svg" in page and 'href="/assets/report"' in page and "<script" not in page
            assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(|@import""", page)  # nothing from elsewhere

            raw = await server.json("/api/assets/raw")
            assert raw["health"]["counts"] == {"succeeded": 4, "failed": 1, "missing": 5, "stale": 0, "running": 0}
            assert not raw["health"]["grouped"] and raw["health"]["segments"] == [
                ["2026-01-01", "2026-01-03", 3, {"succeeded": 3}], ["2026-01-04", "2026-01-04", 1, {"failed": 1}],
                ["2026-01-05", "2026-01-05", 1, {"succeeded": 1}], ["2026-01-06", "2026-01-10", 5, {"missing": 5}],
            ]
            assert [r["partition"] for r in raw["records"]][:2] == ["2026-01-05", "2026-01-04"]
            assert raw["dependents"] == ["clean"] and raw["next"] is None
            html = await server.html("/assets/raw")
            assert 'data-state="failed"' in html and "2026-01-06..2026-01-10 (5): 5 missing" in html

            failed = next(r for r in raw["records"] if r["status"] == "failed")
            shown = await server.json(f"/api/records/{failed['id']}")
            assert shown["record"]["error_message"] == "ValueError: bad file on the 4th"
            assert "Traceback" in (await server.html(f"/records/{failed['id']}"))

            listed = (await server.json("/api/assets/clean"))["records"]
            made = next(r for r in listed if r["partition"] == "2026-01-02")
            lineage = await server.json(f"/api/records/{made['id']}")
            [up] = lineage["upstream"]
            assert (up["asset"], up["partition"], up["record"]["status"]) == ("raw", "2026-01-02", "success")
            assert lineage["downstream"] == []  # report not built yet
            below = await server.json(f"/api/records/{up['record']['id']}")
            assert [(d["asset"], d["record"]["id"]) for d in below["downstream"]] == [("clean", made["id"])]

            daemon = await server.json("/api/daemon")
            assert daemon["daemon"] is None and daemon["schedules"][0]["asset"] == "report"
            assert "no daemon has run" in await server.html("/daemon")
            assert (await server.client.get("/assets/nope")).status_code == 404
            missing = await server.client.get("/api/records/00000000-0000-0000-0000-000000000000")
            assert missing.status_code == 404 and missing.json()["type"] == "NotFound"
            await server.client.aclose()
            stop.set()


async def test_records_come_a_page_at_a_time(anyio_backend):
    p, stop = pipeline(), anyio.Event()
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        for _ in range(3):
            for day in DAYS.keys(date(2026, 1, 5), date(2026, 1, 10)):
                await rt.materialize("raw", day, force=True)  # 18 records, 6 partitions
        async with anyio.create_task_group() as tasks:
            from flowstone.web import data

            server = await _serving(tasks, store, p, stop)
            seen, bookmark = [], ""
            while bookmark is not None:
                page = await server.json(f"/api/assets/raw?before={bookmark}" if bookmark else "/api/assets/raw")
                assert len(page["records"]) <= data.PAGE
                seen += [r["id"] for r in page["records"]]
                bookmark = page["next"]
            assert len(seen) == len(set(seen)) == 18
            await server.client.aclose()
            stop.set()


async def test_a_token_is_needed_and_a_browser_gets_it_as_a_cookie(anyio_backend):
    p, stop = pipeline(), anyio.Event()
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store):
        async with anyio.create_task_group() as tasks:
            server = await _serving(tasks, store, p, stop, token="s3cret")
            async with httpx.AsyncClient(base_url=server.url) as anonymous:
                assert (await anonymous.get("/api/graph")).status_code == 401
                wrong = await anonymous.get("/api/graph", headers={"Authorization": "Bearer guess"})
                assert wrong.status_code == 401
                visit = await anonymous.get("/assets/raw?token=s3cret")
                assert visit.status_code == 303 and visit.headers["location"].endswith("/assets/raw")
                assert (await anonymous.get("/assets/raw")).status_code == 200  # the cookie it was given
            assert (await server.json("/api/graph"))["layers"]
            await server.client.aclose()
            stop.set()


async def test_a_server_shows_only_its_tenant(anyio_backend):
    p, stop = pipeline(), anyio.Event()
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        with fs.tenant_scope("acme"):
            theirs = (await rt.materialize("raw", date(2026, 1, 1))).materializations["raw"]
        async with anyio.create_task_group() as tasks:
            server = await _serving(tasks, store, p, stop, tenant="globex")
            assert (await server.json("/api/assets/raw"))["records"] == []
            assert (await server.client.get(f"/api/records/{theirs.id}")).status_code == 404
            acme = await _serving(tasks, store, p, stop, tenant="acme")
            assert [r["id"] for r in (await acme.json("/api/assets/raw"))["records"]] == [str(theirs.id)]
            await server.client.aclose()
            await acme.client.aclose()
            stop.set()


async def test_backfill_progress_streams_until_it_ends(anyio_backend):
    gate, stop = anyio.Event(), anyio.Event()
    p = pipeline(gate)
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        backfill = await rt.backfill("raw", max_parallel=10)

        async def waiting_at_the_gate() -> bool:
            status = await rt.backfill_status(backfill)
            return status.succeeded + status.failed == 5

        await until(waiting_at_the_gate)
        async with anyio.create_task_group() as tasks:
            server = await _serving(tasks, store, p, stop, runtime=rt)
            assert "EventSource" in await server.html(f"/backfills/{backfill}")
            updates = []
            async with server.client.stream("GET", f"/api/backfills/{backfill}/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        updates.append(json.loads(line[6:]))
                        if len(updates) == 1:
                            gate.set()  # the rest may finish now
            assert updates[0]["state"] == "running" and updates[0]["succeeded"] == 4
            assert (updates[-1]["state"], updates[-1]["succeeded"], updates[-1]["failed"]) == ("failed", 9, 1)
            listed = await server.json("/api/backfills")
            assert listed["backfills"][0]["id"] == str(backfill) and listed["next"] is None
            assert (await server.client.get("/api/backfills?offset=-1")).status_code == 400
            await server.client.aclose()
            stop.set()


def test_a_bar_of_many_runs_groups_partitions_and_keeps_every_failure():
    from flowstone.store.health import MAX_SEGMENTS, health
    from flowstone.web import html

    keys = [f"k{n:05d}" for n in range(5_000)]
    states = {key: (fs.Status.FAILED if n % 3 == 0 else fs.Status.SUCCESS) for n, key in enumerate(keys[:4_000])}
    bar = health(keys, states)
    assert bar["grouped"] and len(bar["segments"]) <= MAX_SEGMENTS
    assert bar["counts"] == {"succeeded": 2_666, "failed": 1_334, "missing": 1_000, "stale": 0, "running": 0}
    assert sum(s[2] for s in bar["segments"]) == 5_000  # every partition in exactly one segment
    assert sum(s[3].get("failed", 0) for s in bar["segments"]) == 1_334  # none lost, none overstated
    assert bar["segments"][-1] == ["k04000", "k04999", 1_000, {"missing": 1_000}]  # one-state groups merge
    drawn = html.health_svg(bar)
    groups_with_failures = sum(1 for s in bar["segments"] if "failed" in s[3])
    assert drawn.count('data-state="failed"') == groups_with_failures
    assert drawn.count('data-state="succeeded"') == 1  # the ground: the others are drawn on it


async def test_a_health_bar_past_its_second_is_shown_once_more_while_it_is_refreshed(anyio_backend):
    from flowstone.web import data

    p = pipeline()
    raw = p.get("raw")
    async with fs.store.MemoryStore() as store, fs.open_runtime(p, store=store) as rt:
        cache = data.HealthCache(seconds=0)  # always past its time: the stale path every time
        first = await cache.health(store, raw)
        assert first["counts"]["succeeded"] == 0
        await rt.materialize("raw", date(2026, 1, 1))
        later = []
        assert await cache.health(store, raw, later=later) is first  # answered at once, as it was
        assert len(later) == 1 and await cache.health(store, raw, later=[]) is first  # one refresh at a time
        await later[0]()  # what the server runs after answering
        assert (await cache.health(store, raw, later=[]))["counts"]["succeeded"] == 1
        await rt.materialize("raw", date(2026, 1, 2))
        assert (await cache.health(store, raw))["counts"]["succeeded"] == 2  # no later: computed now
        assert (await data.HealthCache(stale=0).health(store, raw, later=[]))["counts"]["succeeded"] == 2
