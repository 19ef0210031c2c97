"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (the ``otel`` extra).

One span per run (``flowstone.run``) and one per materialization
(``flowstone.materialize``, a child of its run's span), with the asset, partition,
tenant and status as attributes. The API is looked for when a runtime opens,
never at ``import flowstone``; without it the runtime holds ``None`` and each
run and materialization pays one ``is None`` check. With the API but no tracer
provider configured (no SDK set up), spans would go to OpenTelemetry's no-op
tracer at a real cost (measured: a third more instructions per backfilled
partition), so none are made until a provider is set.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["Tracing", "attributes", "tracing"]

_NAME = "flowstone"
_MISSING = object()


class Tracing:
    """The tracer of whichever provider OpenTelemetry has now, or None while it has
    none configured (a provider may be set after the runtime opened)."""

    def __init__(self, trace: Any, version: str) -> None:
        self._trace = trace
        self._version = version
        self._unset = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._provider: Any = None
        self._tracer: Any = None

    def tracer(self) -> Any:
        # get_tracer_provider() reads os.environ on every call while no provider is
        # set (1.5 µs, twice per backfilled partition); the module's own global says
        # the same for the price of an attribute read. Where it is missing (another
        # version of the API), the public call answers.
        provider: Any = getattr(self._trace, "_TRACER_PROVIDER", _MISSING)
        if provider is None:
            return None
        if provider is _MISSING:
            provider = self._trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider = provider
            self._tracer = None if isinstance(provider, self._unset) else provider.get_tracer(_NAME, self._version)
        return self._tracer


def tracing() -> Tracing | None:
    """FlowStone's access to OpenTelemetry, or None when its API is not installed."""
    if importlib.util.find_spec("opentelemetry") is None:
        return None
    try:
        from opentelemetry import trace
    except ImportError:  # another opentelemetry-* package, without the API
        return None
    from ..version import __version__

    trace.get_tracer_provider()  # a provider named by OTEL_PYTHON_TRACER_PROVIDER is set up now
    return Tracing(trace, __version__)


def attributes(**values: Any) -> dict[str, Any]:
    """``flowstone.<name>`` attributes, leaving out what is None (spans hold no nulls)."""
    return {f"flowstone.{name}": value for name, value in values.items() if value is not None}
