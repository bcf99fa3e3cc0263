"""How the run store encodes fields, and what a step message shows as its arguments.

``literal`` and ``decode_fields`` run for every field of every record a step claims and commits; both have fast
paths (one shared JSON encoder; one parse for a whole record), so these tests hold them to the plain definitions
they replace, on generated values: JSON of every shape, values JSON cannot encode (``default=str``), and stored
values that are not JSON at all. The step message's ``argsrepr``/``kwargsrepr`` (what Flower shows) are given by
teamster instead of computed by Celery's ``saferepr``; the last test reads a sent message back from Redis and
compares them with what Celery would have written.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from enum import Enum
from typing import Any

import pytest
import redis
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from teamster.config.settings import load_settings
from teamster.orchestrator.enqueue import CeleryEnqueuer
from teamster.orchestrator.store import decode_fields, literal


class Colour(Enum):
    RED = "red"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
odd_values = st.sampled_from([Colour.RED, dt.datetime(2026, 11, 28, 12, 0), uuid.UUID(int=7), float("nan"),
                              float("inf")])


def reference_literal(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def reference_decode(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


@given(st.one_of(json_values, odd_values, st.lists(odd_values, max_size=3)))
def test_literal_is_json_dumps_with_compact_separators_and_str_for_the_rest(value: Any) -> None:
    assert literal(value) == reference_literal(value)


# a stored value: what literal() writes, or a string that need not be JSON (a counter, a number Lua wrote, text)
stored_values = st.one_of(json_values.map(literal), st.text(max_size=12),
                          st.sampled_from(["", "3", "1.5e+09", "nan", "[1", "2]", "1,2", '"open', "{}", " "]))


@settings(max_examples=300)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=10), stored_values), max_size=12, unique_by=lambda p: p[0]))
def test_decode_fields_reads_each_value_as_json_or_keeps_it_as_text(pairs: list[tuple[str, str]]) -> None:
    expected = reference_decode(pairs)
    assert decode_fields(dict(pairs)) == expected
    assert decode_fields([item for pair in pairs for item in pair]) == expected  # the flat list Lua returns


def test_decode_fields_maps_each_value_to_its_own_field_when_values_are_not_json() -> None:
    # not JSON on their own, though "[1,2],3,4" would parse as three values: each field keeps its own text
    raw = {"a": "[1", "b": "2]", "c": "3,4"}
    assert decode_fields(raw) == {"a": "[1", "b": "2]", "c": "3,4"}


def test_a_flat_field_list_of_odd_length_is_an_error() -> None:
    with pytest.raises(ValueError):
        decode_fields(["status", '"running"', "fence"])


def test_a_step_message_shows_the_arguments_celery_would_show(redis_url: str, redis_client: redis.Redis) -> None:
    conf = load_settings().model_copy(update={"key_prefix": f"enc-{uuid.uuid4().hex[:8]}",
                                              "steps_queue": "encoding-test"})
    enqueuer = CeleryEnqueuer.for_settings(conf, redis_url)
    run_id, step_key = "run_" + "x" * 196, "review[12]." + "k" * 289  # the longest a StepMessage allows
    try:
        enqueuer.enqueue(run_id, step_key, label="wf.review:agent")
        [raw] = redis_client.lrange(f"{conf.key_prefix}:celery:{conf.steps_queue}", 0, -1)
        message = json.loads(raw)
        headers = message["headers"]
        kwargs = json.loads(base64.b64decode(message["body"]))[1]
        assert kwargs == {"message": {"run_id": run_id, "step_key": step_key}}
        maxsize = enqueuer.app.amqp.kwargsrepr_maxsize
        assert headers["argsrepr"] == saferepr((), enqueuer.app.amqp.argsrepr_maxsize)
        assert headers["kwargsrepr"] == saferepr(kwargs, maxsize)
        assert len(headers["kwargsrepr"]) < maxsize  # nothing that saferepr would have cut
        assert headers["shadow"] == "wf.review:agent" and headers["id"] == f"{run_id}:{step_key}"
    finally:
        for key in redis_client.scan_iter(f"{conf.key_prefix}:*"):
            redis_client.delete(key)
