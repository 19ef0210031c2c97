"""pytest fixtures for pipelines built on FlowStone: an isolated runtime per test.

Installed with FlowStone (entry point ``pytest11``); nothing to configure. With
the anyio pytest plugin (``pytest.mark.anyio``)::

    @pytest.mark.flowstone(assets=[raw, report])
    async def test_report(flowstone_runtime):
        await flowstone_runtime.materialize("report")

The runtime is fresh for every test: its own memory store and memory IO, and the
built-in ``filesystem`` and ``parquet`` managers under the test's ``tmp_path``
(never the working directory). Keyword arguments of the marker other than
``assets`` go to ``open_runtime`` (``io_managers``, ``resources``, ``guard``...).
Instead of the marker, a fixture named ``flowstone_assets`` may return the assets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

__all__ = ["flowstone_runtime"]


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "flowstone(assets, **options): the assets (and open_runtime options) of flowstone_runtime"
    )


@pytest.fixture
async def flowstone_runtime(request: Any, tmp_path: Any) -> AsyncIterator[Any]:
    """A runtime of its own for this test; stopped (and checked to stop) after it."""
    import flowstone as fs

    marker = request.node.get_closest_marker("flowstone")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    assets = options.pop("assets", None)
    if assets is None and marker is not None and marker.args:
        assets = marker.args[0]
    if assets is None:
        try:
            assets = request.getfixturevalue("flowstone_assets")
        except pytest.FixtureLookupError:
            raise pytest.UsageError(
                "flowstone_runtime needs assets: mark the test @pytest.mark.flowstone(assets=[...]) "
                "or define a fixture named flowstone_assets"
            ) from None
    managers = {
        "filesystem": fs.io.FilesystemIO(tmp_path / "storage", durable=False),
        "parquet": fs.io.ParquetIO(tmp_path / "parquet", durable=False),
        **dict(options.pop("io_managers", {}) or {}),
    }
    async with fs.open_runtime(assets, io_managers=managers, **options) as runtime:
        yield runtime

