"""OpenTelemetry spans per run and per materialization (SPEC 11), checked with the
SDK's in-memory exporter. On asyncio and trio."""

from __future__ import annotations

import subprocess
import sys
from datetime import date

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import flowstone as fs

pytestmark = pytest.mark.anyio

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans():
    """The spans finished during the test (one provider per process: OpenTelemetry
    lets the global provider be set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


async def test_a_run_is_a_span_and_each_materialization_a_child_of_it(anyio_backend, spans):
    async def raw(ctx, deps):
        return 1

    def report(ctx, deps):
        return deps["raw"] + 1

    daily = fs.DailyPartitions(start=date(2025, 1, 1))
    assets = [fs.Asset(name="raw", execute_fn=raw, partitioned_by=daily),
              fs.Asset(name="report", execute_fn=report, depends_on=["raw"], partitioned_by=daily)]
    async with fs.open_runtime(assets) as rt:
        with fs.tenant_scope("acme"):
            result = await rt.materialize("report", date(2025, 1, 15))
    finished = {span.name: [] for span in spans.get_finished_spans()}
    for span in spans.get_finished_spans():
        finished[span.name].append(span)
    [run] = finished["flowstone.run"]
    materializations = finished["flowstone.materialize"]
    assert sorted(s.attributes["flowstone.asset"] for s in materializations) == ["raw", "report"]
    for span in materializations:
        assert span.parent.span_id == run.context.span_id and span.context.trace_id == run.context.trace_id
        assert span.attributes["flowstone.partition"] == "2025-01-15"
        assert span.attributes["flowstone.tenant"] == "acme" and span.attributes["flowstone.status"] == "success"
        assert span.attributes["flowstone.run_id"] == str(result.run_id)
    assert run.attributes["flowstone.asset"] == "report" and run.attributes["flowstone.status"] == "success"


async def test_a_failed_materialization_span_says_so(anyio_backend, spans):
    async def broken(ctx, deps):
        raise ValueError("no")

    async with fs.open_runtime([fs.Asset(name="broken", execute_fn=broken)]) as rt:
        with pytest.raises(fs.MaterializationFailed):
            await rt.materialize("broken")
    by_name = {span.name: span for span in spans.get_finished_spans()}
    assert by_name["flowstone.materialize"].attributes["flowstone.status"] == "failed"
    assert by_name["flowstone.run"].attributes["flowstone.status"] == "failed"
    assert "flowstone.tenant" not in by_name["flowstone.run"].attributes  # no tenant: no attribute


def test_with_the_api_but_no_provider_configured_no_span_is_made():
    """OpenTelemetry's no-op tracer is not free: until an SDK provider is set, FlowStone
    makes no span at all; once one is set (even after the runtime opened), it does."""
    script = (
        "import anyio\n"
        "import flowstone as fs\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "async def main():\n"
        "    async with fs.open_runtime([fs.Asset(name='a', execute_fn=lambda ctx, deps: 1)]) as rt:\n"
        "        assert rt._env.tracing.tracer() is None\n"
        "        await rt.materialize('a')\n"
        "        exporter, provider = InMemorySpanExporter(), TracerProvider()\n"
        "        provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "        trace.set_tracer_provider(provider)\n"
        "        await rt.materialize('a', force=True)\n"
        "        print(sorted(span.name for span in exporter.get_finished_spans()))\n"
        "anyio.run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['flowstone.materialize', 'flowstone.run']", done.stderr


def test_without_the_api_nothing_is_imported_and_no_tracer_is_held():
    """``import flowstone`` never imports OpenTelemetry; a runtime opened where the API
    is missing holds no tracer (the only cost is one ``is None`` check)."""
    script = (
        "import sys, importlib.util, anyio\n"
        "import flowstone as fs\n"
        "assert not any(name.startswith('opentelemetry') for name in sys.modules), 'imported at import time'\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'opentelemetry' else real(name, *a)\n"
        "async def main():\n"
        "    async with fs.open_runtime([fs.Asset(name='a', execute_fn=lambda ctx, deps: 1)]) as rt:\n"
        "        assert rt._env.tracing is None\n"
        "        await rt.materialize('a')\n"
        "    assert not any(name.startswith('opentelemetry') for name in sys.modules)\n"
        "anyio.run(main)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
