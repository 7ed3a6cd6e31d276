"""OpenTelemetry traces: one tracer provider per process, and only when an exporter is configured.

`setup` installs the SDK's provider when `settings.tracing` (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_TRACES_EXPORTER set, `none` excepted): spans go through a batch processor to the exporters
OTEL_TRACES_EXPORTER names (`otlp`, OTLP over HTTP, the default; `console`). The SDK reads its own
standard variables for the rest (the exporter's endpoint, headers, TLS and timeout, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_SDK_DISABLED). Off, nothing is built: no provider, no
processor, no exporter thread, and every function here returns at its first line.

Tests install a provider of their own (an in-memory exporter) with `install`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from core.settings import Settings, SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

API_SERVICE = "workflow-runs-api"
WORKER_SERVICE = "workflow-runs-worker"
INSTRUMENTATION_SCOPE = "workflow-runs"
EXPORTERS = ("otlp", "console")


class _Installed:
    """The process's provider and the project's tracer from it (none, and one recording nothing)."""

    provider: TracerProvider | None = None
    tracer: trace.Tracer = trace.NoOpTracer()


_installed = _Installed()


def enabled() -> bool:
    """Whether this process has a tracer provider (set up, or installed by a test)."""
    return _installed.provider is not None


def tracer() -> trace.Tracer:
    """The project's tracer: the installed provider's, else one that records nothing."""
    return _installed.tracer


def setup(settings: Settings, *, service: str) -> bool:
    """Install the process's tracer provider when `settings.tracing`, once (later calls keep the
    first); `service` is the service name unless OTEL_SERVICE_NAME (or `service.name` in
    OTEL_RESOURCE_ATTRIBUTES) names one. Whether tracing is on. Raises `SettingsError` for an
    exporter this service does not ship."""
    if not settings.tracing:
        return False
    if _installed.provider is not None:
        return True
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(name) for name in _exporter_names(settings)]
    resource = Resource.create()  # the SDK's reading of OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    # Global too, so that libraries asking OpenTelemetry's API for a tracer export with ours.
    trace.set_tracer_provider(provider)
    install(provider)
    return True


def install(provider: TracerProvider | None) -> None:
    """Make `provider` this process's (None: none). `setup` calls it; tests call it with a
    provider of their own (the global provider can be set only once per process)."""
    _installed.provider = provider
    _installed.tracer = provider.get_tracer(INSTRUMENTATION_SCOPE) if provider is not None else trace.NoOpTracer()


def shutdown() -> None:
    """Export the spans still queued and stop the exporters (at process exit; a no-op when off)."""
    provider = _installed.provider
    if provider is None:
        return
    install(None)
    provider.shutdown()


def backend_call(backend: str, call: str, seconds: float, *, failed: bool) -> None:
    """Record a call to a backend that has just ended after `seconds`, as a client span under the
    current one (a request's, an activity's). A call made outside any span (the update hub's
    reader, polling for every stream at once) is not traced: it belongs to no one request."""
    if _installed.provider is None:
        return
    if not trace.get_current_span().is_recording():
        return
    end = time.time_ns()
    span = _installed.tracer.start_span(
        f"{backend} {call}",
        kind=SpanKind.CLIENT,
        start_time=end - round(seconds * 1e9),
        attributes=_backend_attributes(backend, call),
    )
    if failed:
        span.set_attribute("error.type", "_OTHER")
        span.set_status(Status(StatusCode.ERROR, f"{backend} {call} failed"))
    span.end(end_time=end)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's context to outgoing HTTP `headers` (W3C `traceparent`, `tracestate`,
    `baggage`); nothing when tracing is off or no span is current."""
    if _installed.provider is not None:
        propagate.inject(headers)


def _backend_attributes(backend: str, call: str) -> dict[str, str]:
    attributes = {"workflow_runs.backend": backend, "workflow_runs.call": call}
    if backend == "redis":
        attributes |= {"db.system.name": "redis", "db.operation.name": call}
    return attributes


def _exporter_names(settings: Settings) -> list[str]:
    """OTEL_TRACES_EXPORTER as a list (the specification allows several, comma-separated); unset
    with OTEL_EXPORTER_OTLP_ENDPOINT set, `otlp`."""
    raw = settings.otel_traces_exporter or "otlp"
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown or not names:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER must be otlp, console (or both, comma-separated) or none, not {raw!r}"
        )
    return list(dict.fromkeys(names))


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # The stdout of now: the exporter's default is the one of when the SDK was imported.
        return ConsoleSpanExporter(out=sys.stdout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Its endpoint, headers, certificates, compression and timeout come from the OTEL_EXPORTER_OTLP_*
    # variables, read by the exporter (OTEL_EXPORTER_OTLP_ENDPOINT gets `/v1/traces` appended).
    return OTLPSpanExporter()
