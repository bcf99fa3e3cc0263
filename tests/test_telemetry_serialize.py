"""teamster's faster ``serialize`` for strands' span attributes gives strands' own output, for any value."""

from __future__ import annotations

import datetime
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from strands.telemetry import tracer
from strands.tools.executors import _executor

from teamster.agents import _telemetry

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
_odd = st.sampled_from([datetime.date(2026, 11, 28), datetime.datetime(2026, 11, 28, 9, 0), object(), b"bytes",
                        {1, 2}, (1, object())])
_mixed = st.recursive(
    _json | _odd,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


def _strands(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, cls=tracer.JSONEncoder)  # strands' serialize, as it is written


def test_it_is_installed_where_strands_looks_it_up() -> None:
    import teamster.agents.runner  # noqa: F401, PLC0415 - importing the runner installs it

    assert tracer.serialize is _telemetry.serialize
    assert _executor.serialize is _telemetry.serialize  # type: ignore[attr-defined]
    assert _telemetry.install() is True  # idempotent


@settings(max_examples=300, deadline=None)
@given(_json)
def test_plain_json_data_serialises_exactly_as_strands_does(value: Any) -> None:
    assert _telemetry.serialize(value) == _strands(value)


@settings(max_examples=300, deadline=None)
@given(_mixed)
def test_values_json_cannot_encode_fall_back_to_strands(value: Any) -> None:
    _telemetry.install()
    assert _telemetry.serialize(value) == _strands(value)
