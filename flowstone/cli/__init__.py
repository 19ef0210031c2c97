"""The ``flowstone`` command line (also ``python -m flowstone``).

Only ``argparse`` is imported to parse the command line; each command loads what
it needs when it runs, so ``flowstone --help`` starts in a few tens of
milliseconds. Exit codes: 0 done; 1 a materialization or backfill failed; 2 bad
usage or definition; 3 the store or storage is unreachable; 130 interrupted.
An error is one line naming the problem and what to do; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = """\
The pipeline comes from --pipeline, else FLOWSTONE_PIPELINE, else
[tool.flowstone] pipeline = "module:attr" in ./pyproject.toml. The store comes
from --store, else FLOWSTONE_DSN, else sqlite:///.flowstone/flowstone.db (made
on first use); postgresql://... selects PostgreSQL. Values are kept by
FilesystemIO under .flowstone/storage unless an asset names its IO manager.

exit codes: 0 done, 1 a materialization or backfill failed, 2 bad usage or
definition, 3 the store or storage is unreachable, 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"flowstone: error: {message} (see '{self.prog} --help')\n")


def _common(default: object) -> _Parser:
    """The options every command takes, before or after its name. After it, they
    default to nothing, so they do not undo what was given before it."""
    common = _Parser(add_help=False, argument_default=default)
    common.add_argument("--pipeline", metavar="MODULE:ATTR", help="the pipeline to load (default: see below)")
    common.add_argument("--store", metavar="URL", help="sqlite:///path or postgresql://... (default: see below)")
    common.add_argument("--tenant", metavar="T", help="act as this tenant")
    common.add_argument("--json", action="store_true", help="machine-readable output (reading commands)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common(None)
    parser = _Parser(
        prog="flowstone", description="FlowStone: asset-first orchestration for async Python.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=about, description=about, parents=[_common(argparse.SUPPRESS)])

    command("assets", "list the pipeline's assets")
    graph = command("graph", "show the dependency graph")
    graph.add_argument("--format", choices=["text", "mermaid", "dot"], default="text")

    materialize = command("materialize", "compute an asset (and what it needs) for one partition")
    materialize.add_argument("asset")
    materialize.add_argument("--partition", metavar="P", help="the partition key, e.g. 2013-01-01")
    materialize.add_argument("--force", action="store_true", help="recompute the asset even if up to date")
    materialize.add_argument("--upstream", choices=["missing", "none", "all"], default="missing",
                             help="which upstream assets to compute (default: missing, stale or changed ones)")

    backfill = command("backfill", "compute an asset over many partitions, with a progress bar")
    backfill.add_argument("asset")
    backfill.add_argument("--from", dest="start", metavar="A", help="first partition (with --to)")
    backfill.add_argument("--to", dest="end", metavar="B", help="last partition, included")
    backfill.add_argument("--partition", dest="partitions", action="append", metavar="P",
                          help="a partition (repeatable); without --from/--to/--partition: every partition")
    backfill.add_argument("--max-parallel", type=int, default=10, metavar="N", help="partitions at once (10)")
    backfill.add_argument("--upstream", choices=["missing", "none", "all"], default="missing")
    backfill.add_argument("--force", action="store_true", help="recompute partitions even if up to date")
    backfill.add_argument("--workers", action="store_true",
                          help="send the partitions to flowstone worker processes (PostgreSQL store)")
    backfill.add_argument("--detach", action="store_true",
                          help="run it in a background process; print its id and return at once")
    backfill.add_argument("--announce", metavar="PATH", help=argparse.SUPPRESS)  # how --detach learns the id

    status = command("status", "per asset: partitions succeeded, failed, missing, stale, as ranges")
    status.add_argument("asset", nargs="?")

    records = command("records", "materialization records, newest first")
    records.add_argument("asset", nargs="?")
    records.add_argument("--partition", metavar="P")
    records.add_argument("--status", metavar="S", help="pending, running, success, failed, stale, ...")
    records.add_argument("--limit", type=int, default=20, metavar="N", help="at most N records (20)")

    lineage = command("lineage", "what an asset's latest success was built from (or what was built on it)")
    lineage.add_argument("asset")
    lineage.add_argument("--partition", metavar="P")
    lineage.add_argument("--downstream", action="store_true", help="what was built on it instead")

    backfills = command("backfills", "recent backfills and how far they got")
    backfills.add_argument("--limit", type=int, default=20, metavar="N")

    resume = command("resume", "run again, here, what a stopped backfill did not finish")
    resume.add_argument("id")

    cancel = command("cancel", "stop a running backfill, wherever it runs, and wait until it has")
    cancel.add_argument("id")

    approve = command("approve", "let a materialization waiting for approval run (wherever it waits)")
    approve.add_argument("id")
    reject = command("reject", "fail a materialization waiting for approval, with a reason")
    reject.add_argument("id")
    reject.add_argument("--reason", required=True, metavar="R")

    daemon = command("daemon", "run the schedules, sensors and automation, and resume unfinished backfills, "
                               "until SIGTERM/SIGINT (one active per store; others wait as standbys)")
    dev = command("dev", "the daemon for local work: shorter grace and hold; the flights example when no "
                         "pipeline is configured")
    for parser_, grace, hold, looks in ((daemon, 30.0, 15.0, 10.0), (dev, 5.0, 5.0, 2.0)):
        parser_.add_argument("--grace", type=float, default=grace, metavar="S",
                             help=f"seconds work in flight may take to finish once stopping ({grace:g})")
        parser_.add_argument("--hold", type=float, default=hold, metavar="S",
                             help="seconds the active daemon's hold lasts without a heartbeat; a standby takes "
                                  f"over that long after it dies ({hold:g})")
        parser_.add_argument("--automation-interval", type=float, default=looks, metavar="S",
                             help=f"seconds between two looks for upstream changes and missing partitions ({looks:g})")
        parser_.add_argument("--log-format", choices=["text", "json"], default="text",
                             help="log lines as text, or one JSON object per line")
        parser_.add_argument("--workers", action="store_true",
                             help="send backfills to flowstone worker processes, and hand back the jobs of "
                                  "workers that died (PostgreSQL store)")

    web = command("web", "serve the web view (read-only): asset graph, partition health, records and lineage, "
                         "backfills live, the daemon")
    for parser_, default_port in ((web, 3000), (dev, 3000)):
        parser_.add_argument("--host", default="127.0.0.1", help="the address to listen on (127.0.0.1: this machine)")
        parser_.add_argument("--port", type=int, default=default_port, metavar="N",
                             help=f"the port ({default_port}; 0: any free one)")
        parser_.add_argument("--token", metavar="T", help="require this bearer token (or FLOWSTONE_WEB_TOKEN)")
    dev.add_argument("--no-web", action="store_true", help="the daemon only")

    worker = command("worker", "execute materializations sent through the PostgreSQL queue (flowstone[workers]), "
                               "until SIGTERM/SIGINT")
    worker.add_argument("--concurrency", type=int, default=4, metavar="N", help="jobs at once (4)")
    worker.add_argument("--serve-tenant", action="append", dest="serve_tenants", metavar="T",
                        help="take jobs of this tenant only (repeatable; default: any)")
    worker.add_argument("--lease-seconds", type=float, default=30.0, metavar="S",
                        help="how long a partition stays locked after this worker dies mid-job (30)")

    prune = command("prune", "delete the history records (superseded, failed, cancelled) the assets' retention "
                             "no longer keeps")
    retention_options = (
        ("--keep-last", int, "N", "keep the N newest history records of each partition"),
        ("--max-age", str, "AGE", "delete history records older than AGE (e.g. 30d, 12h, 90m, 3600 seconds)"),
    )
    for parser_, about in ((prune, ""), (daemon, "; the daemon prunes every --prune-interval"),
                           (dev, "; the daemon prunes every --prune-interval")):
        for flag, kind, metavar, text in retention_options:
            parser_.add_argument(flag, type=kind, metavar=metavar,
                                 help=f"{text}, for assets without a retention of their own{about}")
    for parser_, every in ((daemon, 3600.0), (dev, 60.0)):
        parser_.add_argument("--prune-interval", type=float, default=every, metavar="S",
                             help=f"seconds between two prunes ({every:g})")

    command("migrate", "create or upgrade the store's schema")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit code (the console script exits with it)."""
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.version:
        from ..version import __version__

        print(f"flowstone {__version__}")
        return EXIT_OK
    if args.command is None:
        _parser().print_help()
        return EXIT_USAGE
    from .run import run_command

    return run_command(args)

