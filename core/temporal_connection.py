"""How every process of the project connects to Temporal (the API, the sample worker, `start`):
the local dev server, a self-hosted cluster with (m)TLS, or Temporal Cloud with an API key, all from
the client profile `Settings.from_env` loaded through `temporalio.envconfig`.

With tracing on (`Settings.tracing`), the client carries temporalio's OpenTelemetry interceptor:
every start, signal and query sends the caller's trace context in the call's Temporal headers, and
a worker built on that client continues it in its workflow and activity spans. (A cancel or
terminate request has no headers to carry it in.)"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from temporalio.client import Client, Interceptor
from temporalio.envconfig import ClientConnectConfig

from core import tracing
from core.settings import Settings

if TYPE_CHECKING:
    from temporalio.contrib.opentelemetry import TracingInterceptor


def connect_config(settings: Settings) -> ClientConnectConfig:
    """`Client.connect`'s arguments: the profile's (API key, TLS, gRPC metadata) with the settings'
    address and namespace, which callers such as `dev` and the tests may have replaced."""
    config = settings.temporal_profile.to_client_connect_config()
    config["target_host"] = settings.temporal_address
    config["namespace"] = settings.temporal_namespace
    return config


async def connect(settings: Settings, **options: Any) -> Client:
    """A client for the settings' cluster; `options` go to `Client.connect` (its `interceptors`
    come after the tracing one)."""
    if settings.tracing:
        options["interceptors"] = [tracing_interceptor(), *options.get("interceptors", ())]
    return await Client.connect(**connect_config(settings), **options)


def tracing_interceptor() -> Interceptor:
    """temporalio's tracing interceptor on the project's tracer, signals traced in their sender's
    trace (see `_interceptor_class`)."""
    return _interceptor_class()(tracing.tracer())


@functools.cache
def _interceptor_class() -> type[TracingInterceptor]:
    """Built on first use: temporalio's OpenTelemetry module costs ~0.1 s to import, which a
    process without tracing does not pay.

    temporalio puts a signal's `HandleSignal` span in the run's own trace (the one its start came
    with, none when it was started untraced) and only links the sender's. A signal sent through the
    API is the API request's doing, so here, as temporalio does for queries, the span (and whatever
    the handler itself calls) continues the sender's trace, linked to the run's; a signal that
    carries no trace context is traced as temporalio does. This uses the interceptor's own helpers
    (`_completed_span`, which also skips spans while the workflow replays, `_set_on_context`,
    `_load_workflow_context_carrier`): temporalio is pinned, and tests/integration/test_tracing.py
    fails if they change."""
    import opentelemetry.trace
    from temporalio import worker
    from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor
    from temporalio.contrib.opentelemetry._context import attached_context

    class SignalInCallersTrace(TracingWorkflowInboundInterceptor):
        async def handle_signal(self, input: worker.HandleSignalInput) -> None:
            header = input.headers.get(self.header_key)
            if not header:
                await super().handle_signal(input)
                return
            carrier = self.payload_converter.from_payloads([header])[0]
            context = self._set_on_context(self.text_map_propagator.extract(carrier))
            with attached_context(context):
                self._completed_span(
                    f"HandleSignal:{input.signal}",
                    link_context_carrier=self._load_workflow_context_carrier(),
                    kind=opentelemetry.trace.SpanKind.SERVER,
                )
                await self.next.handle_signal(input)

    class ProjectTracingInterceptor(TracingInterceptor):
        def workflow_interceptor_class(
            self, input: worker.WorkflowInterceptorClassInput
        ) -> type[TracingWorkflowInboundInterceptor]:
            super().workflow_interceptor_class(input)  # registers the extern function workflow spans use
            return SignalInCallersTrace

    return ProjectTracingInterceptor
