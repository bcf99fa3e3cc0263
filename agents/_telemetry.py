"""A faster ``serialize`` for strands' span attributes, with the same output.

strands serialises span attributes with ``strands.telemetry.tracer.serialize`` whether or not a tracer records them
(with tracing off, OpenTelemetry's spans are non-recording and drop them). Its encoder walks the value in Python and
calls ``json.dumps`` once per leaf, to replace what JSON cannot encode with ``"<replaced>"``. Every tool call pays it
for the tool's whole input schema (``gen_ai.tool.json_schema``): on the real provider path that was about 8 % of a
worker's CPU, for the structured-output tool every agent step calls.

:func:`serialize` gives the same string: a value JSON can encode is encoded in one call of the C encoder, exactly as
strands' encoder would encode it after its walk (which rebuilds the same dicts and lists and keeps every leaf); any
other value falls back to strands' own function. :func:`install` puts it where strands looks it up (the tracer module
and the tool executor, which imported it by name); it is idempotent, and leaves strands alone if those names move.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["install", "serialize"]

log = logging.getLogger(__name__)

_original: Callable[[Any], str] | None = None


def serialize(obj: Any) -> str:
    """``strands.telemetry.tracer.serialize(obj)``, without its per-leaf walk when ``obj`` is plain JSON data."""
    try:
        return json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError, OverflowError):
        assert _original is not None
        return _original(obj)


def install() -> bool:
    """Use :func:`serialize` in strands' tracer and tool executor; returns whether it is in place."""
    global _original
    try:
        from strands.telemetry import tracer  # noqa: PLC0415
        from strands.tools.executors import _executor  # noqa: PLC0415
    except ImportError:  # pragma: no cover - strands reorganised: keep its own function
        return False
    current = getattr(tracer, "serialize", None)
    if current is serialize:
        return True
    if not callable(current) or getattr(_executor, "serialize", None) is not current:
        log.debug("strands' serialize is not where teamster expects it; span attributes keep strands' encoder")
        return False
    _original = current
    tracer.serialize = serialize
    setattr(_executor, "serialize", serialize)  # noqa: B010 - imported there by name, not re-exported
    return True
