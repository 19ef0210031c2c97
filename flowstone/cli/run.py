"""Running one command: the tenant, the event loop, and errors as exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import nullcontext

from . import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNREACHABLE, EXIT_USAGE
from .config import CliError, UserCodeError

__all__ = ["exit_code", "run_command"]


def run_command(args: argparse.Namespace) -> int:
    import anyio

    from ..errors import single_error
    from ..tenancy import tenant_scope
    from . import commands

    json_lines = getattr(args, "log_format", "text") == "json"
    _logging(args.debug, info=args.command in ("daemon", "dev", "web", "worker"), json_lines=json_lines,
             also=("procrastinate",) if args.command == "worker" else ())
    handler = getattr(commands, f"cmd_{args.command}")
    try:
        async def main() -> int:
            try:
                code: int = await handler(args)
                return code
            except BaseExceptionGroup as group:  # from a command's task group: the error inside it
                raise single_error(group) from None

        with tenant_scope(args.tenant) if args.tenant else nullcontext():
            return anyio.run(main)
    except KeyboardInterrupt:
        hint = ("; the backfill is saved interrupted: 'flowstone resume ID' or a running daemon continues it, "
                "'flowstone cancel ID' stops it for good (ids: 'flowstone backfills')"
                if args.command in ("backfill", "resume") else "")
        print(f"flowstone: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserCodeError as error:
        sys.stderr.write(error.traceback)
        print(f"flowstone: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"flowstone: error: {describe(error)}", file=sys.stderr)
        return exit_code(error)


def exit_code(error: BaseException) -> int:
    """1 a materialization failed; 3 the store or storage cannot be reached or used;
    2 everything else the user can fix (usage, definitions, unknown names)."""
    from ..errors import DatabaseError, FlowstoneError, MaterializationFailed, StorageError

    if isinstance(error, CliError):
        return error.code
    if isinstance(error, MaterializationFailed):
        return EXIT_FAILED
    if isinstance(error, (DatabaseError, StorageError, OSError)):
        return EXIT_UNREACHABLE
    if isinstance(error, FlowstoneError):
        return EXIT_USAGE
    return EXIT_FAILED


def describe(error: BaseException) -> str:
    """One line: the message, with what to do when that is known."""
    from ..errors import DatabaseError, FlowstoneError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, DatabaseError) and "does not exist" in text and "relation" in text:
        text += " (the schema is missing: run 'flowstone migrate')"
    if not isinstance(error, (FlowstoneError, CliError, OSError)):
        text = f"{type(error).__name__}: {text} (an unexpected error: run with --debug for the traceback)"
    return text


def _logging(debug: bool, *, info: bool = False, json_lines: bool = False, also: tuple[str, ...] = ()) -> None:
    """Failures are reported by the command itself; the library's warnings only with
    --debug. A long-running command (``info``) logs what it does, as text lines or
    one JSON object per line, with the loggers ``also`` named."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("flowstone", *also):  # also: the loggers of what a command runs (a worker's queue)
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if debug else logging.INFO if info else logging.ERROR)


class JsonLines(logging.Formatter):
    """One JSON object per log line: time (UTC, ISO 8601), level, logger, message,
    and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import datetime, timezone

        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)

