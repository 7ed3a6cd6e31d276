"""`core.tracing.setup`: nothing at all when traces are off; when on, the SDK's provider with a
batch processor, exporting OTLP over HTTP to the endpoint the standard variables name, under the
service name OTEL_SERVICE_NAME gives (else the one the process passes), flushed by `shutdown`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from core import tracing
from core.settings import Settings, SettingsError


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver on a free local port: what it received, by request."""

    endpoint: str
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received."""
        received = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    received += [(attributes["service.name"], span.name) for span in scope_spans.spans]
        return received


@pytest.fixture
def collector() -> Iterator[Collector]:
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                received.append(ExportTraceServiceRequest.FromString(body))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Collector(f"http://127.0.0.1:{server.server_address[1]}", received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def global_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[trace.TracerProvider]]:
    """The providers `setup` makes global, recorded instead of set: OpenTelemetry's API accepts a
    global provider once per process, and this one is shared by every test."""
    made_global: list[trace.TracerProvider] = []
    monkeypatch.setattr(trace, "set_tracer_provider", made_global.append)
    yield made_global
    tracing.shutdown()


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(otel_traces_exporter="none"),
        Settings(otel_exporter_otlp_endpoint="x", otel_traces_exporter="None"),
    ],
)
def test_off_builds_nothing(settings: Settings, global_provider: list[trace.TracerProvider]) -> None:
    assert tracing.setup(settings, service=tracing.API_SERVICE) is False
    assert not tracing.enabled() and global_provider == []
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    tracing.shutdown()  # nothing to flush


@pytest.mark.parametrize("exporter", ["zipkin", "otlp,jaeger", " , "])
def test_an_exporter_this_service_does_not_ship_is_refused(
    exporter: str, global_provider: list[trace.TracerProvider]
) -> None:
    with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER"):
        tracing.setup(Settings(otel_traces_exporter=exporter), service=tracing.API_SERVICE)
    assert not tracing.enabled()


def test_spans_are_exported_over_otlp_http_and_flushed_at_shutdown(
    collector: Collector, global_provider: list[trace.TracerProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The exporter reads its endpoint as the SDK does; the settings only say traces are on.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    settings = Settings(otel_exporter_otlp_endpoint=collector.endpoint)
    assert tracing.setup(settings, service=tracing.WORKER_SERVICE) is True
    first = tracing.tracer()
    assert tracing.setup(settings, service=tracing.API_SERVICE) is True  # once per process
    assert tracing.tracer() is first and len(global_provider) == 1
    with tracing.tracer().start_as_current_span("work"):
        pass
    assert collector.requests == []  # batched, not sent span by span
    tracing.shutdown()
    assert collector.spans() == [(tracing.WORKER_SERVICE, "work")]
    assert not tracing.enabled()


def test_otel_service_name_names_the_service(
    collector: Collector, global_provider: list[trace.TracerProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "runs-api-eu")
    assert tracing.setup(Settings(otel_traces_exporter="otlp"), service=tracing.API_SERVICE)
    with tracing.tracer().start_as_current_span("work"):
        pass
    tracing.shutdown()
    assert collector.spans() == [("runs-api-eu", "work")]


def test_the_console_exporter_writes_spans_to_stdout(
    global_provider: list[trace.TracerProvider], capsys: pytest.CaptureFixture[str]
) -> None:
    assert tracing.setup(Settings(otel_traces_exporter="console"), service=tracing.API_SERVICE)
    with tracing.tracer().start_as_current_span("printed"):
        pass
    tracing.shutdown()
    assert '"name": "printed"' in capsys.readouterr().out
