"""OpenTelemetry spans per run and step, off unless ``TEAMSTER_TRACING`` is ``console`` or ``otlp``.

Every span of a run lives in one trace whose id is the run's ``trace_id`` (stored on the run record and
carried in every dead-letter entry), whichever worker runs which step. strands-agents creates its own agent,
model and tool spans under the current span, so they land in the same trace.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

__all__ = ["configure_tracing", "new_trace_id", "step_span"]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("teamster")
_configured = False


def new_trace_id() -> str:
    """A random 128-bit trace id as 32 hex digits (W3C format)."""
    return secrets.token_hex(16)


def configure_tracing(mode: str, service_name: str = "teamster") -> None:
    """Install an SDK tracer provider exporting to the console or OTLP (``mode`` ``off`` does nothing)."""
    global _configured
    if mode == "off" or _configured:
        return
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if mode == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
        except ImportError as exc:
            from teamster.errors import MissingExtra  # noqa: PLC0415

            raise MissingExtra("TEAMSTER_TRACING=otlp needs the OTLP exporter",
                               hint="pip install 'teamster[otlp]'") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    log.info("teamster tracing: %s", mode)


@contextlib.contextmanager
def step_span(trace_id: str, name: str, attributes: dict[str, Any]) -> Iterator[trace.Span]:
    """A span in the run's trace (parented on a remote context carrying the run's trace id)."""
    parent = None
    try:
        span_context = SpanContext(trace_id=int(trace_id, 16), span_id=int(trace_id[:16], 16) or 1,
                                   is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        parent = trace.set_span_in_context(NonRecordingSpan(span_context))
    except (TypeError, ValueError):
        parent = None
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes) as span:
        yield span
