"""The commands. Each ``cmd_<name>(args)`` runs in the event loop and returns the exit code."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .. import events as ev
from ..definitions import Retention
from ..errors import InvalidPartition
from ..partitions import serialize_partition
from ..pipeline import Pipeline
from ..plumbing.collector import tune_collector
from ..runtime.runtime import Runtime, open_runtime
from ..store.health import key_strings
from ..store.records import Status
from ..web.data import automation_name, backfill_json, daemon_json, sensor_json
from . import EXIT_FAILED, EXIT_OK
from .config import CliError, load_pipeline, open_store, pipeline_reference, store_url
from .progress import ProgressView
from .render import (
    STATES,
    describe_range,
    dot,
    emit_json,
    mermaid,
    partition_summary,
    record_json,
    table,
    text_tree,
)

RANGES_SHOWN = 8
"""Ranges per state that ``status`` prints for an asset; ``--json`` has them all."""

EVENT_BUFFER = 10_000


def _pipeline(args: argparse.Namespace) -> Pipeline:
    pipeline: Pipeline = load_pipeline(pipeline_reference(args.pipeline))
    pipeline.validate()
    return pipeline


@asynccontextmanager
async def _store(args: argparse.Namespace, *, must_exist: bool = True) -> AsyncIterator[Any]:
    """The store the command uses (SQLite or PostgreSQL), closed when the command ends."""
    store = open_store(store_url(args.store), must_exist=must_exist)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def _runtime(
    args: argparse.Namespace, pipeline: Pipeline | None = None, *, queue: str | None = None, **options: Any,
) -> AsyncIterator[Runtime]:
    """The command's runtime; ``queue``: "required" (``--workers``: its backfills go to
    the workers) or "if-any" (``resume``: a queue when the store and extra allow, for a
    backfill saved as on workers), else none."""
    pipeline = pipeline or _pipeline(args)
    async with _store(args, must_exist=False) as store, _queue(args, queue) as sender, open_runtime(
        pipeline, store=store, default_io_manager="filesystem", queue=sender, **options
    ) as rt:
        tune_collector()  # this process is FlowStone's (ADR 0049)
        yield rt


@asynccontextmanager
async def _queue(args: argparse.Namespace, wanted: str | None) -> AsyncIterator[Any]:
    """The work queue in the store's PostgreSQL database, closed when the command ends."""
    url = store_url(args.store)
    postgres = url.startswith(("postgresql://", "postgres://"))
    if wanted is None or (wanted == "if-any" and not postgres):
        yield None
        return
    if not postgres:
        raise CliError("workers take their jobs from the PostgreSQL store: --store postgresql://...")
    if not _has_procrastinate():
        if wanted == "if-any":
            yield None
            return
        raise CliError("workers need their extra: pip install 'flowstone[workers]'")
    from ..workers.queue import Queue

    queue = Queue(url)
    try:
        yield queue
    finally:
        await queue.close()


def _has_procrastinate() -> bool:
    import importlib.util

    return importlib.util.find_spec("procrastinate") is not None


def _partition(pipeline: Pipeline, asset: str, given: str | None) -> Any:
    """The partition value of ``given`` (its key as typed) for ``asset``."""
    definition = pipeline.get(asset).partitioned_by
    if definition is None:
        if given is not None:
            raise InvalidPartition(f"asset {asset!r} is not partitioned: leave out --partition", asset=asset)
        return None
    if given is None:
        raise InvalidPartition(f"asset {asset!r} is partitioned: give --partition (for example "
                               f"{_example(definition)})", asset=asset)
    return definition.validate(given)


def _example(definition: Any) -> str:
    keys = definition.keys()
    return str(serialize_partition(keys[0])) if len(keys) else "a key"


# ---------------------------------------------------------------- reading


async def cmd_assets(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    rows: list[dict[str, Any]] = []
    for asset in pipeline.assets:
        rows.append({
            "name": asset.name, "depends_on": list(asset.depends_on), "io_manager": asset.io_manager,
            "partitions": _describe_partitions(asset.partitioned_by), "code_version": asset.code_version,
            "description": asset.description, "automation": automation_name(asset.automation),
        })
    from ..plumbing.clock import utcnow

    now = utcnow()
    schedules: list[dict[str, Any]] = [{
        "name": s.name, "asset": s.asset, "cron": s.cron, "timezone": s.timezone, "catch_up": s.catch_up,
        "next_tick": s.next_tick(now).isoformat(),
    } for s in pipeline.schedules]
    sensors = [{"name": s.name, "interval": s.interval} for s in pipeline.sensors]
    if args.json:
        emit_json({"assets": rows, "schedules": schedules, "sensors": sensors})
        return EXIT_OK
    print(table(["asset", "partitions", "depends on", "io manager", "automation", "description"], [
        [r["name"], r["partitions"] or "-", ", ".join(r["depends_on"]) or "-", r["io_manager"] or "(default)",
         r["automation"] or "-", _short(r["description"] or "", 60)]
        for r in rows
    ]))
    if schedules:
        print()
        print(table(["schedule", "asset", "cron", "time zone", "catch up", "next tick (UTC)"], [
            [s["name"], s["asset"], s["cron"], s["timezone"], s["catch_up"], s["next_tick"][:16]] for s in schedules
        ]))
    if sensors:
        print()
        print(table(["sensor", "every (s)"], [[s["name"], f"{s['interval']:g}"] for s in sensors]))
    return EXIT_OK


def _describe_partitions(definition: Any) -> str | None:
    if definition is None:
        return None
    name = type(definition).__name__.removesuffix("Partitions").lower()
    start, end = getattr(definition, "start", None), getattr(definition, "end", None)
    if start is not None:
        return f"{name} {serialize_partition(start)}..{serialize_partition(end) if end is not None else ''}"
    return f"{name} ({len(definition.keys())})"


async def cmd_graph(args: argparse.Namespace) -> int:
    graph = _pipeline(args).graph()
    names = [asset.name for asset in graph.assets]
    edges = [(dep, asset.name) for asset in graph.assets for dep in asset.depends_on]
    if args.json:
        emit_json({"assets": names, "edges": [list(edge) for edge in edges]})
    elif args.format == "mermaid":
        print(mermaid(names, edges))
    elif args.format == "dot":
        print(dot(names, edges))
    else:
        readers: dict[str, list[str]] = {name: [] for name in names}
        for upstream, downstream in edges:
            readers[upstream].append(downstream)
        roots = [asset.name for asset in graph.assets if not asset.depends_on]
        print(text_tree(roots, readers))
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    assets = [pipeline.get(args.asset)] if args.asset else list(pipeline.assets)
    async with _store(args) as store:
        summaries = []
        for asset in assets:
            states = await store.partition_states(asset.name)
            definition = asset.partitioned_by
            keys: list[str | None] = [None] if definition is None else list(key_strings(definition))
            summary = partition_summary(keys, states)
            summaries.append({"asset": asset.name, "partitioned": definition is not None, **summary})
        last = await store.last_ticks() if pipeline.schedules else {}
        daemon = daemon_json(await store.role_holder("daemon"))
        cursors = {c.name: c for c in await store.list_cursors()} if pipeline.sensors else {}
    sensors = [sensor_json(s, cursors.get(f"sensor:{s.name}")) for s in pipeline.sensors]
    ticks = [{
        "schedule": s.name, "asset": s.asset, "last_tick": last[s.name].at.isoformat() if s.name in last else None,
        "state": last[s.name].state if s.name in last else None,
        "error": last[s.name].error if s.name in last else None,
    } for s in pipeline.schedules]
    if args.json:
        emit_json({"assets": summaries, "schedules": ticks, "sensors": sensors, "daemon": daemon})
        return EXIT_OK
    print(table(["asset", "partitions", *STATES], [
        [s["asset"], s["total"] if s["partitioned"] else "-", *(s["counts"][state] for state in STATES)]
        for s in summaries
    ]))
    for s in summaries:
        if not s["partitioned"] or s["total"] == 0:
            continue
        print(f"\n{s['asset']}")
        for state in STATES:
            runs = s["ranges"][state]
            if not runs:
                continue
            shown = ", ".join(describe_range(*run) for run in runs[:RANGES_SHOWN])
            hidden = len(runs) - RANGES_SHOWN
            more = f", ... and {hidden} more ranges (--json lists them)" if hidden > 0 else ""
            print(f"  {state:<10} {s['counts'][state]:>7}  {shown}{more}")
    if ticks:
        print()
        print(table(["schedule", "asset", "last tick", "state", "error"], [
            [t["schedule"], t["asset"], (t["last_tick"] or "never")[:16], t["state"] or "-",
             _short(t["error"] or "", 60)]
            for t in ticks
        ]))
    if sensors:
        print()
        print(table(["sensor", "last call", "cursor", "error"], [
            [t["sensor"], (t["last_call"] or "never")[:19], _short(t["cursor"] or "-", 30),
             _short(t["error"] or "", 60)]
            for t in sensors
        ]))
    if ticks or sensors or daemon is not None:
        print(f"\ndaemon: {_describe_daemon(daemon)}")
    return EXIT_OK


def _describe_daemon(daemon: dict[str, Any] | None) -> str:
    from datetime import datetime

    from ..plumbing.clock import utcnow

    if daemon is None:
        return "none running (start one with 'flowstone daemon')"
    beat = daemon["heartbeat_at"]
    ago = f"{(utcnow() - datetime.fromisoformat(beat)).total_seconds():.0f}s ago" if beat else "never"
    if daemon["active"]:
        return f"{daemon['owner']} is active (heartbeat {ago})"
    return f"{daemon['owner']} went quiet (last heartbeat {ago}); a standby takes over, or start 'flowstone daemon'"


async def cmd_records(args: argparse.Namespace) -> int:
    if type(args.limit) is not int or args.limit < 1:
        raise CliError("--limit must be at least 1")
    status = Status(args.status) if args.status in {s.value for s in Status} else None
    if args.status and status is None:
        raise CliError(f"unknown status {args.status!r}; one of: {', '.join(s.value for s in Status)}")
    partition = None
    if args.partition is not None:
        if not args.asset:
            raise CliError("--partition needs an asset: flowstone records ASSET --partition P")
        partition = serialize_partition(_partition(_pipeline(args), args.asset, args.partition))
    filtered = (status is not None and args.asset) or partition is not None
    fetch = 100_000 if filtered else args.limit
    async with _store(args) as store:
        if status is not None:
            found = await store.list_by_status(status, limit=fetch)
        else:
            found = await store.list_all(asset_name=args.asset, limit=fetch)
    chosen = [
        r for r in found
        if (not args.asset or r.asset_name == args.asset) and (partition is None or r.partition == partition)
    ][: args.limit]
    if args.json:
        emit_json({"records": [record_json(r) for r in chosen]})
        return EXIT_OK
    print(table(["id", "asset", "partition", "status", "started", "ms", "error"], [
        [str(r.id)[:8], r.asset_name, r.partition or "-", r.status.value, r.started_at, r.duration_ms,
         _short(r.error_message or "", 60)]
        for r in chosen
    ]))
    return EXIT_OK


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


async def cmd_lineage(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    graph = pipeline.graph()
    start = serialize_partition(_partition(pipeline, args.asset, args.partition)) if (
        args.partition is not None or pipeline.get(args.asset).partitioned_by is None) else None
    async with _store(args) as store:
        if start is None and pipeline.get(args.asset).partitioned_by is not None:
            keys = sorted(k for k in await store.partitions_of(args.asset) if k is not None)
        else:
            keys = [start]
        if args.downstream:
            tree = await _downstream(store, graph, args.asset, keys)
        else:
            tree = await _upstream(store, args.asset, keys, depth=0)
    if args.json:
        emit_json(tree)
        return EXIT_OK
    children: dict[str, list[str]] = {}
    labels: dict[str, str] = {}

    def index(node: dict[str, Any], path: str) -> None:
        labels[path] = _lineage_label(node)
        children[path] = []
        for number, child in enumerate(node["children"]):
            child_path = f"{path}/{number}"
            children[path].append(child_path)
            index(child, child_path)

    index(tree, "root")
    print(text_tree(["root"], children, label=labels.__getitem__))
    return EXIT_OK


def _lineage_label(node: dict[str, Any]) -> str:
    keys = node["partitions"]
    where = "" if keys == [None] else (
        f" @ {keys[0]}" if len(keys) == 1 else f" @ {len(keys)} partitions {keys[0]}..{keys[-1]}" if keys else
        " (no partitions)")
    found = node["records"]
    if not found:
        return f"{node['asset']}{where}: never succeeded"
    latest = max((r["completed_at"] or "" for r in found), default="")
    states = sorted({r["status"] for r in found})
    return f"{node['asset']}{where}: {', '.join(states)}" + (f", latest {latest[:19]}" if latest else "")


_LINEAGE_DEPTH = 50


async def _upstream(store: Any, asset: str, keys: Sequence[str | None], depth: int) -> dict[str, Any]:
    found = await store.latest_successes([(asset, key) for key in keys])
    records = [found[(asset, key)] for key in keys if (asset, key) in found]
    reads: dict[str, dict[str | None, None]] = {}
    for record in records:
        for upstream, upstream_keys in record.upstream_partitions.items():
            reads.setdefault(upstream, {}).update(dict.fromkeys(upstream_keys))
    children = []
    if depth < _LINEAGE_DEPTH:
        for upstream, upstream_keys in reads.items():
            children.append(await _upstream(store, upstream, list(upstream_keys), depth + 1))
    return {"asset": asset, "partitions": list(keys), "records": [_brief(r) for r in records], "children": children}


async def _downstream(store: Any, graph: Any, asset: str, keys: Sequence[str | None]) -> dict[str, Any]:
    wanted = set(keys)
    found = await store.latest_successes([(asset, key) for key in keys])
    children = []
    for reader in sorted(name for name in graph.dependents(asset) if asset in graph.get(name).depends_on):
        built = [
            r for r in (await store.partitions_of(reader)).values()
            if wanted & set(r.upstream_partitions.get(asset, ()))
        ]
        if built:
            children.append(await _downstream(store, graph, reader, sorted(
                (r.partition for r in built), key=lambda k: (k is not None, k or ""))))
    return {"asset": asset, "partitions": list(keys), "records": [_brief(r) for r in found.values()],
            "children": children}


def _brief(record: Any) -> dict[str, Any]:
    return {"id": str(record.id), "partition": record.partition, "status": record.status.value,
            "completed_at": record.completed_at.isoformat() if record.completed_at else None}


async def cmd_backfills(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        statuses = await store.list_backfill_statuses(limit=args.limit)
    rows = [backfill_json(status) for status in statuses]
    if args.json:
        emit_json({"backfills": rows})
        return EXIT_OK
    print(table(["id", "asset", "state", "total", "succeeded", "failed", "cancelled", "started", "finished"], [
        [r["id"], r["asset"], "interrupted" if r["interrupted"] else r["state"], r["total"], r["succeeded"],
         r["failed"], r["cancelled"], (r["started_at"] or "-")[:19], (r["finished_at"] or "-")[:19]]
        for r in rows
    ]))
    return EXIT_OK


# ---------------------------------------------------------------- running


async def cmd_migrate(args: argparse.Namespace) -> int:
    async with _store(args, must_exist=False) as store:
        applied = await store.migrate()
    if args.json:
        emit_json({"applied": applied})
    else:
        print(f"migrated: applied {', '.join(map(str, applied))}" if applied else "the schema is up to date")
    return EXIT_OK


async def cmd_prune(args: argparse.Namespace) -> int:
    async with _runtime(args, retention=_retention(args)) as rt:
        deleted = await rt.prune()  # an entry per asset whose retention limits anything
        finished = await rt.prune_finished()
    if args.json:
        emit_json({"deleted": deleted, "finished_deleted": finished})
        return EXIT_OK
    if not deleted:
        print("no retention anywhere: nothing to prune (give --keep-last N or --max-age AGE, or "
              "fs.asset(..., retention=fs.Retention(...)))")
    else:
        print(table(["asset", "history records deleted"], [[name, count] for name, count in deleted.items()]))
    if args.max_age is not None:
        print(f"finished backfills and schedule ticks deleted: {finished}")
    return EXIT_OK


def _retention(args: argparse.Namespace) -> Any:
    """The runtime-wide ``fs.Retention`` of ``--keep-last`` and ``--max-age``, else None."""
    if args.keep_last is None and args.max_age is None:
        return None
    if args.keep_last is not None and args.keep_last < 0:
        raise CliError("--keep-last must be at least 0")
    return Retention(keep_last=args.keep_last, max_age=_age(args.max_age) if args.max_age is not None else None)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """Seconds of ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a plain number of seconds."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise CliError(f"--max-age {text!r}: give a number with s, m, h, d or w (e.g. 30d)") from None
    if not 0 < seconds < float("inf"):
        raise CliError(f"--max-age {text!r} must be more than 0")
    return seconds


async def cmd_materialize(args: argparse.Namespace) -> int:
    from ..errors import MaterializationFailed

    async with _runtime(args) as rt:
        pipeline = Pipeline("cli", assets=await rt.assets())
        partition = _partition(pipeline, args.asset, args.partition)
        total = 1 if args.upstream == "none" else len(pipeline.graph().execution_order(args.asset))
        view = ProgressView(f"materialize {args.asset}", total, "assets", quiet=args.json)
        failure: MaterializationFailed | None = None
        async with rt.events(buffer=EVENT_BUFFER) as events:
            async def watch() -> None:
                done = failed = skipped = 0
                async for event in events:
                    if isinstance(event, (ev.MaterializationSucceeded, ev.MaterializationSkipped)):
                        done += 1
                        skipped += isinstance(event, ev.MaterializationSkipped)
                    elif isinstance(event, ev.MaterializationFailed):
                        failed += 1
                    view.update(done=done, failed=failed, skipped=skipped)

            import anyio

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                try:
                    result = await rt.materialize(
                        args.asset, partition, upstream=args.upstream, force=args.force)
                except MaterializationFailed as error:
                    failure, result = error, error.result
                tasks.cancel_scope.cancel()
        records = list(result.materializations.values()) if result is not None else []
        view.total = len(records) or view.total  # what the run planned, now that it is known
        view.update(  # the result is the last word: events still queued are not waited for
            done=sum(r.status is Status.SUCCESS for r in records),
            failed=sum(r.status is Status.FAILED for r in records),
            skipped=len(result.skipped) if result is not None else 0,
        )
        view.close()
    if args.json:
        emit_json({"ok": failure is None, "error": str(failure) if failure else None,
                   "skipped": list(result.skipped) if result is not None else [],
                   "records": [record_json(r) for r in records]})
    else:
        skipped = set(result.skipped) if result is not None else set()
        print(table(["asset", "partition", "status", "ms", "note"], [
            [r.asset_name, r.partition or "-", r.status.value, r.duration_ms,
             "up to date: reused" if r.asset_name in skipped else _short(r.error_message or "", 60)]
            for r in records
        ]))
        if failure is not None:
            print(f"flowstone: materialization failed: {failure}")
    return EXIT_OK if failure is None else EXIT_FAILED


async def cmd_backfill(args: argparse.Namespace) -> int:
    if type(args.max_parallel) is not int or args.max_parallel < 1:
        raise CliError("--max-parallel must be at least 1")
    if args.detach:
        return await _detach(args)
    async with _runtime(args, queue="required" if args.workers else None) as rt:
        pipeline = Pipeline("cli", assets=await rt.assets())
        partitions = _backfill_partitions(pipeline, args)

        async def start() -> uuid.UUID:
            return await rt.backfill(args.asset, partitions, max_parallel=args.max_parallel,
                                     upstream=args.upstream, force=args.force, workers=args.workers)

        status = await _follow_backfill(rt, args, f"backfill {args.asset}", start)
    return _backfill_summary(args, status)


async def cmd_resume(args: argparse.Namespace) -> int:
    async with _runtime(args, queue="if-any") as rt:
        async def start() -> uuid.UUID:
            return await rt.resume_backfill(args.id)

        status = await _follow_backfill(rt, args, f"resume {args.id[:8]}", start)
    return _backfill_summary(args, status)


async def cmd_approve(args: argparse.Namespace) -> int:
    return await _decide(args, True, None)


async def cmd_reject(args: argparse.Namespace) -> int:
    return await _decide(args, False, args.reason)


async def _decide(args: argparse.Namespace, approve: bool, reason: str | None) -> int:
    """Keep the decision in the store; the process whose run waits for it acts on it."""
    async with _store(args) as store:
        record = await store.decide(args.id, approve, reason)
    if args.json:
        emit_json({"id": str(record.id), "asset": record.asset_name, "partition": record.partition,
                   "decision": "approved" if approve else "rejected", "reason": reason})
    else:
        where = f" @ {record.partition}" if record.partition is not None else ""
        print(f"{'approved' if approve else 'rejected'}: {record.asset_name}{where} ({record.id}); "
              "the run waiting for it goes on within a second")
    return EXIT_OK


CANCEL_POLL = 0.5
"""Seconds between two looks at a backfill that was asked to stop."""


async def cmd_cancel(args: argparse.Namespace) -> int:
    """Ask the owner of a running backfill to stop it (it does at its next checkpoint),
    and wait until it has; a backfill whose owner died is closed here, and one
    interrupted (its process stopped) is marked so that no daemon resumes it."""
    import socket

    import anyio
    import attrs

    from ..errors import BackfillOwned
    from ..plumbing.clock import utcnow
    from ..runtime.backfill import CHECKPOINT_SECONDS, STALE_SECONDS
    from ..store.backfills import Saved
    from ..store.records import parse_id

    backfill = parse_id(args.id, "backfill")
    me = f"{socket.gethostname()}:{os.getpid()}:cancel"
    async with _store(args) as store:
        saved = await store.request_cancel(backfill)
        with anyio.move_on_after(STALE_SECONDS + 2 * CHECKPOINT_SECONDS + 10):
            while saved.status.state == "running":
                try:
                    claim = await store.claim_backfill(backfill, me, stale_after=STALE_SECONDS)
                except BackfillOwned:  # its owner is alive: it stops at its next checkpoint
                    await anyio.sleep(CANCEL_POLL)
                    # Its status alone, twice a second: the spec (every partition) does not change.
                    saved = Saved(saved.spec, await store.load_backfill_status(backfill))
                    continue
                status = claim.saved.status
                if status.state == "running":  # its owner is gone: close it here
                    if claim.previous_owner is not None:
                        await store.close_orphans(
                            claim.previous_owner, f"orphaned: {claim.previous_owner} stopped; cancelled by {me}")
                    status = attrs.evolve(
                        status, state="cancelled", queued=0, running=0, finished_at=utcnow(),
                        cancelled=status.total - status.succeeded - status.failed,
                    )
                    await store.save_backfill(backfill, Saved(claim.saved.spec, status), owner=me)
                saved = await store.load_backfill(backfill)
        if saved.status.interrupted:  # stopped with its process: cancelled for good, never resumed by a daemon
            claim = await store.claim_backfill(backfill, me, stale_after=STALE_SECONDS)
            saved = Saved(claim.saved.spec, attrs.evolve(claim.saved.status, interrupted=False))
            await store.save_backfill(backfill, saved, owner=me)
    if saved.status.state == "running":
        raise CliError(f"backfill {backfill} is still running: its owner did not stop in time", code=EXIT_FAILED)
    if args.json:
        emit_json(backfill_json(saved.status))
    else:
        status = saved.status
        print(f"backfill {backfill}: {status.state} ({status.succeeded} succeeded, {status.failed} failed, "
              f"{status.cancelled} cancelled of {status.total})")
    return EXIT_OK


async def cmd_daemon(args: argparse.Namespace) -> int:
    """Be the store's daemon (a standby while another is active) until SIGTERM or
    SIGINT; then work in flight gets --grace seconds, and a second signal cancels it at once."""
    import anyio

    from ..runtime.daemon import run_daemon

    if not 0 <= args.grace < 86400:
        raise CliError("--grace must be a number of seconds >= 0")
    if not 0 < args.hold < 86400:
        raise CliError("--hold must be a number of seconds > 0")
    if not 0 < args.automation_interval < 86400:
        raise CliError("--automation-interval must be a number of seconds > 0")
    pipeline = _pipeline(args)
    stop = anyio.Event()
    if not 0 < args.prune_interval < 86400 * 365:
        raise CliError("--prune-interval must be a number of seconds > 0")
    async with _runtime(args, pipeline, queue="required" if args.workers else None,
                        retention=_retention(args)) as rt, anyio.create_task_group() as daemon:
        daemon.start_soon(_stop_on_signals, stop, daemon.cancel_scope)
        async with anyio.create_task_group() as serving:  # ends once both have stopped
            if args.command == "dev" and not args.no_web:
                serving.start_soon(_serve_web, args, rt.store, pipeline, stop, rt)
            await run_daemon(rt, pipeline.schedules, sensors=pipeline.sensors, stop=stop, grace=args.grace,
                             hold=args.hold, automation_interval=args.automation_interval,
                             prune_interval=args.prune_interval)
        daemon.cancel_scope.cancel()
    return EXIT_OK


EXAMPLE = "flowstone.examples.flights:pipeline"


async def cmd_dev(args: argparse.Namespace) -> int:
    """``daemon`` with local defaults and the web view beside it, on the example
    pipeline when none is configured."""
    import logging

    try:
        pipeline_reference(args.pipeline)
    except CliError:
        args.pipeline = EXAMPLE
        logging.getLogger("flowstone.daemon").info("no pipeline configured: running the example (%s)", EXAMPLE)
    return await cmd_daemon(args)


async def cmd_web(args: argparse.Namespace) -> int:
    """Serve the web view until SIGTERM or SIGINT."""
    import anyio

    pipeline = _pipeline(args)
    stop = anyio.Event()
    async with _store(args, must_exist=False) as store, anyio.create_task_group() as tasks:
        tasks.start_soon(_stop_on_signals, stop, tasks.cancel_scope)
        await _serve_web(args, store, pipeline, stop)
        tasks.cancel_scope.cancel()
    return EXIT_OK


async def _serve_web(args: argparse.Namespace, store: Any, pipeline: Pipeline, stop: Any, runtime: Any = None) -> None:
    """The web view on ``--host``/``--port`` until ``stop`` is set."""

    try:
        from ..web.app import create_app
        from ..web.server import serve
    except ImportError as error:
        raise CliError(f"the web view needs its extra: pip install 'flowstone[web]' ({error})") from None
    if not 0 <= args.port < 65536:
        raise CliError("--port must be between 0 and 65535")
    token = args.token or os.environ.get("FLOWSTONE_WEB_TOKEN") or None
    app = create_app(store, pipeline, tenant=args.tenant, token=token, runtime=runtime, stopping=stop)
    tune_collector()  # the web stack too: a full pass is a pause in every request it overlaps
    try:
        await serve(app, host=args.host, port=args.port, stopping=stop)
    except OSError as error:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}", code=3) from None


async def cmd_worker(args: argparse.Namespace) -> int:
    """Execute queued materializations on this machine until SIGTERM/SIGINT (jobs in
    flight finish first)."""
    url = store_url(args.store)
    if not url.startswith(("postgresql://", "postgres://")):
        raise CliError("a worker needs the PostgreSQL store its jobs come through: --store postgresql://...")
    if type(args.concurrency) is not int or args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    if not 0 < args.lease_seconds < 86400:
        raise CliError("--lease-seconds must be a number of seconds > 0")
    if not _has_procrastinate():
        raise CliError("workers need their extra: pip install 'flowstone[workers]'")
    import importlib

    from ..workers.queue import run_worker

    importlib.import_module("procrastinate")  # now, so that tune_collector freezes its ~16,000 objects too
    async with _runtime(args, lease_seconds=args.lease_seconds) as rt:
        await run_worker(url, rt, concurrency=args.concurrency, tenants=args.serve_tenants,
                         name=f"{os.uname().nodename}:{os.getpid()}")
    return EXIT_OK


async def _stop_on_signals(stop: Any, now: Any) -> None:
    """The first SIGTERM or SIGINT sets ``stop``; the next one cancels ``now``."""
    import logging
    import signal

    import anyio

    log = logging.getLogger("flowstone.daemon")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for number in received:
            name = signal.Signals(number).name
            if stop.is_set():
                log.warning("%s again: cancelling the work in flight now", name)
                now.cancel()
                return
            log.info("%s: stopping (again to cancel the work in flight at once)", name)
            stop.set()


def _backfill_partitions(pipeline: Pipeline, args: argparse.Namespace) -> Any:
    definition = pipeline.get(args.asset).partitioned_by
    if definition is None:
        raise CliError(f"asset {args.asset!r} is not partitioned: use 'flowstone materialize {args.asset}'")
    if (args.start is None) != (args.end is None):
        raise CliError("give both --from and --to (or --partition P, repeated)")
    if args.start is not None and args.partitions:
        raise CliError("give --from/--to or --partition, not both")
    if args.partitions:
        return [definition.validate(p) for p in args.partitions]
    if args.start is not None:
        first, last = definition.validate(args.start), definition.validate(args.end)
        if last < first:
            raise CliError(f"--to {args.end} is before --from {args.start}")
        return definition.keys(first, last)
    return None  # every partition


async def _follow_backfill(
    rt: Runtime, args: argparse.Namespace, title: str, start: Callable[[], Awaitable[uuid.UUID]]
) -> Any:
    """Start the backfill and show its progress until it ends; its final status."""
    async with rt.events(
        asset=args.asset if hasattr(args, "asset") else None, buffer=EVENT_BUFFER,
        kinds=["BackfillProgress", "BackfillFinished", "MaterializationSkipped"],
    ) as events:
        backfill = await start()
        if getattr(args, "announce", None):
            _announce(args.announce, backfill)
        status = await rt.backfill_status(backfill)
        view = ProgressView(title, status.total, "partitions", quiet=args.json)
        skipped = 0
        try:
            if status.done:
                return status
            async for event in events:
                if isinstance(event, ev.MaterializationSkipped):
                    skipped += event.asset == status.asset  # upstream assets reused are not partitions skipped
                elif isinstance(event, ev.BackfillProgress) and event.backfill_id == backfill:
                    view.update(done=event.succeeded, failed=event.failed + event.cancelled, skipped=skipped)
                elif isinstance(event, ev.BackfillFinished) and event.backfill_id == backfill:
                    break
                elif isinstance(event, ev.EventsDropped):  # fell behind: read the counts instead
                    now = await rt.backfill_status(backfill)
                    view.update(done=now.succeeded, failed=now.failed + now.cancelled, skipped=skipped)
            status = await rt.wait_backfill(backfill)
            view.update(done=status.succeeded, failed=status.failed + status.cancelled, skipped=skipped)
        finally:
            view.close()
        args._skipped, args._elapsed, args._rate = skipped, view.elapsed(), view.rate()
    return status


DETACH_SECONDS = 120.0
"""How long ``--detach`` waits for the background process to start the backfill."""


async def _detach(args: argparse.Namespace) -> int:
    """Start the same backfill in a process of its own (a new session: it outlives this
    one and the terminal), wait until it has started, print its id and return."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    import anyio

    logs = Path(".flowstone") / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    announce = Path(tempfile.mkdtemp(prefix="flowstone-detach-")) / "id"
    try:
        command = [sys.executable, "-m", "flowstone", *(a for a in args.argv if a != "--detach"), "--announce",
                   str(announce)]
        log_path = logs / f"backfill-{os.getpid()}-{int(anyio.current_time() * 1000)}.log"
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        with anyio.move_on_after(DETACH_SECONDS):
            while not announce.exists():
                if child.poll() is not None:  # it failed before starting: say why
                    lines = log_path.read_text().strip().splitlines()
                    why = lines[-1].removeprefix("flowstone: error: ") if lines else "the backfill did not start"
                    raise CliError(why, code=child.returncode or EXIT_FAILED)
                await anyio.sleep(0.05)
        if not announce.exists():
            raise CliError(f"the background backfill did not start in {DETACH_SECONDS:g}s; see {log_path}",
                           code=EXIT_FAILED)
        backfill = announce.read_text().strip()
    finally:  # the announcement's folder goes whether the child started or not
        shutil.rmtree(announce.parent, ignore_errors=True)
    if args.json:
        emit_json({"id": backfill, "pid": child.pid, "log": str(log_path)})
    else:
        print(f"backfill {backfill} runs in process {child.pid} (log: {log_path}); "
              f"follow it with 'flowstone backfills', stop it with 'flowstone cancel {backfill}'")
    return EXIT_OK


def _announce(path: str, backfill: uuid.UUID) -> None:
    """Tell the process that started this one (``--detach``) the backfill's id: written
    whole, then renamed, so it never reads half an id. If that process stopped waiting
    (its folder is gone) the backfill goes on all the same, and the log says so."""
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as out:
            out.write(str(backfill))
        os.replace(partial, path)
    except FileNotFoundError:
        print(f"flowstone: backfill {backfill} started after the command that detached it stopped waiting; "
              f"it goes on", file=sys.stderr)


def _backfill_summary(args: argparse.Namespace, status: Any) -> int:
    failed = status.state != "succeeded"
    if args.json:
        emit_json({**backfill_json(status), "skipped": getattr(args, "_skipped", 0),
                   "seconds": round(getattr(args, "_elapsed", 0.0), 3)})
        return EXIT_FAILED if failed else EXIT_OK
    elapsed, rate = getattr(args, "_elapsed", 0.0), getattr(args, "_rate", 0.0)
    print(table(["backfill", "asset", "state", "total", "succeeded", "skipped", "failed", "cancelled", "seconds",
                 "per second"], [
        [str(status.id), status.asset, status.state, status.total, status.succeeded, getattr(args, "_skipped", 0),
         status.failed, status.cancelled, round(elapsed, 2), round(rate, 1)],
    ]))
    if status.errors:
        print("\nfailed partitions:")
        for key, message in status.errors[:10]:
            print(f"  {key}: {_short(message, 100)}")
        if len(status.errors) > 10:
            print(f"  ... and {len(status.errors) - 10} more (flowstone records {status.asset} --status failed)")
    return EXIT_FAILED if failed else EXIT_OK


__all__ = [name for name in dir() if name.startswith("cmd_")]
