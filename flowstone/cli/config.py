"""Where the command line finds the pipeline and the store."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = ["CliError", "UserCodeError", "load_pipeline", "open_store", "pipeline_reference", "store_url"]

DEFAULT_STORE = "sqlite:///.flowstone/flowstone.db"


class CliError(Exception):
    """A problem the command line reports as one line, with its exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class UserCodeError(Exception):
    """The user's module failed to import: their traceback is shown (it is their bug)."""

    def __init__(self, module: str, error: BaseException) -> None:
        super().__init__(f"importing the pipeline module {module!r} failed: {type(error).__name__}: {error}")
        frames = traceback.extract_tb(error.__traceback__)
        # Keep the user's frames: drop the import machinery above their module.
        ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        own = [f for f in frames if not f.filename.startswith((ours, "<frozen")) and "importlib" not in f.filename]
        self.traceback = "".join(
            ["Traceback (most recent call last):\n", *traceback.format_list(own or frames),
             *traceback.format_exception_only(type(error), error)]
        )


def pipeline_reference(given: str | None) -> str:
    """``module:attr`` from the option, the environment, or ./pyproject.toml."""
    if given:
        return given
    if os.environ.get("FLOWSTONE_PIPELINE"):
        return os.environ["FLOWSTONE_PIPELINE"]
    project = Path("pyproject.toml")
    if project.is_file():
        import tomllib

        try:
            found = tomllib.loads(project.read_text()).get("tool", {}).get("flowstone", {}).get("pipeline")
        except tomllib.TOMLDecodeError as error:
            raise CliError(f"pyproject.toml is not valid TOML ({error}); fix it or pass --pipeline") from None
        if isinstance(found, str) and found:
            return found
    raise CliError(
        "no pipeline given: pass --pipeline module:attr, set FLOWSTONE_PIPELINE, or add "
        '[tool.flowstone] pipeline = "module:attr" to ./pyproject.toml'
    )


def load_pipeline(reference: str) -> Any:
    """The ``fs.Pipeline`` named by ``module:attr`` (a list of assets is made one)."""
    from ..definitions import Asset
    from ..pipeline import Pipeline

    module_name, _, attr = reference.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".")):
        raise CliError(f"the pipeline must be given as module:attr (for example my_project.pipeline:pipeline), "
                       f"got {reference!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's project, as `python -m` would see it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise CliError(
                f"cannot find the pipeline module {module_name!r} (from {reference!r}); run flowstone from your "
                "project's folder, or fix --pipeline / FLOWSTONE_PIPELINE"
            ) from None
        raise UserCodeError(module_name, error) from error
    except Exception as error:
        raise UserCodeError(module_name, error) from error
    try:
        found = getattr(module, attr)
    except AttributeError:
        known = sorted(name for name, value in vars(module).items() if isinstance(value, Pipeline))
        hint = f"; pipelines there: {', '.join(known)}" if known else ""
        raise CliError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if isinstance(found, Pipeline):
        return found
    if isinstance(found, (list, tuple)) and all(isinstance(item, Asset) for item in found):
        return Pipeline(attr, assets=list(found))
    raise CliError(f"{reference!r} is a {type(found).__name__}, not an fs.Pipeline or a list of fs.Asset")


def store_url(given: str | None) -> str:
    return given or os.environ.get("FLOWSTONE_DSN") or DEFAULT_STORE


def open_store(url: str, *, must_exist: bool) -> Any:
    """The store at ``url``. ``must_exist``: a reading command on an embedded store
    that was never made says so instead of making an empty one."""
    if url.startswith(("postgresql://", "postgres://")):
        from ..store.postgres import PostgresStore

        return PostgresStore(url)
    from ..store.sqlite import SqliteStore, sqlite_path

    if "://" in url and not url.startswith("sqlite://"):
        scheme = url.split("://", 1)[0]
        raise CliError(f"unknown store {scheme}://...: use sqlite:///path/to/flowstone.db or postgresql://...")
    path = sqlite_path(url)
    if must_exist and not os.path.exists(path):
        raise CliError(
            f"no FlowStone store at {path}: nothing has run here yet (run 'flowstone materialize' or "
            "'flowstone backfill', or 'flowstone migrate' to make an empty one), or pass --store",
            code=3,
        )
    return SqliteStore(path)
