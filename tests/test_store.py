"""The store's transactions against a real Redis: a write whose reply is lost is recognised, not failed.

Redis can apply a transaction and then fail to answer (a connection reset, a timeout). The store retries the write in
place; its guards make the retry a no-op, and the transaction's stamp tells the store that the first try was applied,
so the caller sees success instead of its own guard failing. The lost reply is injected by wrapping the store's
script call: the script really runs on the real Redis, only its answer is dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from teamster.orchestrator.keys import Keys
from teamster.orchestrator.models import RunStatus
from teamster.orchestrator.store import RunStore, Tx, TxRejected
from teamster.testing import WorkflowEnvironment
from tests.harness import wait_until


def _lose_replies(store: RunStore, times: int = 1) -> list[int]:
    """Make the next ``times`` transactions apply on Redis and then fail as if their reply was lost."""
    real: Callable[..., Any] = store._tx
    lost: list[int] = []

    def lossy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if len(lost) < times:
            lost.append(1)
            raise redis.ConnectionError("Connection reset by peer (injected after the script ran)")
        return result

    store._tx = lossy  # type: ignore[method-assign]
    return lost


@pytest.fixture()
def store(redis_client: redis.Redis) -> Iterator[RunStore]:
    keys = Keys(f"teamster-test-store-{uuid.uuid4().hex[:8]}")
    yield RunStore(redis_client, keys, retry_seconds=5)
    for key in redis_client.scan_iter(match=f"{keys.prefix}:*"):
        redis_client.delete(key)


def _create(store: RunStore, key: str, tx: Tx) -> Tx:
    tx.require("new", key, "status", "absent")
    tx.hset(key, {"status": "created"})
    return tx


def test_an_unmarked_transaction_applied_before_its_reply_was_lost_succeeds(store: RunStore) -> None:
    key = f"{store.keys.prefix}:thing"
    tx = _create(store, key, Tx())
    held = tx.condition((key, "first", "absent", None))
    tx.call("HSET", key, "first", "yes", when=held)
    lost = _lose_replies(store)
    assert store.apply(tx) == [True]  # not TxRejected('new'): the retry found the stamp of the first try
    assert lost == [1]
    assert store.client.hgetall(key) == {"status": '"created"', "first": "yes"}
    stamp_key = store.keys.applied(tx.stamp)
    assert store.client.get(stamp_key) == tx.stamp and 0 < store.client.ttl(stamp_key) <= 65


def test_a_marked_transaction_is_recognised_by_its_own_field_and_writes_no_stamp_key(store: RunStore) -> None:
    key = f"{store.keys.prefix}:step"
    tx = _create(store, key, Tx(marker=(key, "last_write")))
    _lose_replies(store)
    assert store.apply(tx) == []
    assert store.client.exists(store.keys.applied(tx.stamp)) == 0


def test_a_transaction_that_really_fails_its_guard_still_fails_after_a_lost_reply(store: RunStore) -> None:
    key = f"{store.keys.prefix}:taken"
    store.client.hset(key, "status", '"other"')
    _lose_replies(store)
    with pytest.raises(TxRejected) as rejected:
        store.apply(_create(store, key, Tx()))  # applied nothing on either try: no stamp to find
    assert rejected.value.guard == "new"


def test_a_submit_whose_reply_is_lost_creates_the_run_once_and_queues_its_first_step() -> None:
    with WorkflowEnvironment(["tests.workflows"]) as env:
        lost = _lose_replies(env.runtime.store)
        run_id = env.submit("t_linear", {"text": "a reply that never came"})
        assert lost == [1]
        assert len(env.queue) == 1  # the first step was sent: without the stamp, create_run saw its own run
        env.drain()
        assert env.client.status(run_id).status == RunStatus.SUCCEEDED
        assert len(env.client.runs()) == 1


# ----------------------------------------------------------------------------- leases: a field of the step record


def test_a_lease_is_the_step_records_own_field_busy_until_it_runs_out_then_taken_over() -> None:
    """Claim, busy, renew, lapse, takeover -- on Redis's clock, with no lease key of its own."""
    with WorkflowEnvironment(["tests.workflows"]) as env:
        store, keys = env.runtime.store, env.runtime.keys
        run_id = env.submit("t_linear", {"text": "lease me"})
        first = store.claim(run_id, "summarize", "worker-a", lease_seconds=0.5)
        assert first.kind == "claimed" and first.token == 1 and first.step is not None
        assert first.step.lease_until is not None and first.previous.value == "queued"  # type: ignore[union-attr]
        assert store.lease_holder(run_id, "summarize") == 1
        assert 0 < store.lease_remaining(run_id, "summarize") <= 0.5
        busy = store.claim(run_id, "summarize", "worker-b", lease_seconds=0.5)
        assert busy.kind == "busy" and busy.holder == "1"
        assert store.renew([(run_id, "summarize", 1)], lease_seconds=0.5) == [(True, RunStatus.RUNNING)]
        assert not [k for k in store.client.scan_iter(match=f"{keys.prefix}:lease:*")]  # no lease key
        wait_until(lambda: store.lease_holder(run_id, "summarize") is None, timeout=5, interval=0.05)
        assert store.lease_remaining(run_id, "summarize") == 0.0
        second = store.claim(run_id, "summarize", "worker-b", lease_seconds=30)
        assert second.kind == "claimed" and second.token == 2 and second.step is not None
        assert second.previous is not None and second.previous.value == "running"  # a takeover
        assert second.step.lease_expiries == 1
        # the first worker's renewal now fails: its token is no longer the step's
        assert store.renew([(run_id, "summarize", 1)], lease_seconds=30) == [(False, RunStatus.RUNNING)]
        assert store.lease_holder(run_id, "summarize") == 2
        score = store.client.zscore(keys.inflight, Keys.member(run_id, "summarize"))
        assert score == pytest.approx(store.get_step(run_id, "summarize").lease_until)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- increments folded into an HSET


def _hincrby_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hincrby", {}).get("calls", 0))


def test_an_increment_of_a_guarded_hash_is_folded_into_its_hset_with_the_same_result(store: RunStore) -> None:
    key, other = f"{store.keys.prefix}:step", f"{store.keys.prefix}:spend"
    store.client.hset(key, mapping={"fence": "1", "spend_calls": "4"})
    tx = Tx(marker=(key, "last_write"))
    tx.require("fence", key, "fence", "eq", 1)
    tx.hset(key, {"status": "succeeded"})
    tx.call("HINCRBY", key, "spend_calls", 2)  # folded: the guards read the hash and an HSET writes it
    tx.call("HINCRBY", key, "spend_tokens", 30)  # folded, from nothing
    tx.call("HINCRBY", other, "tokens", 30)  # not folded: nothing reads or sets that hash
    before = _hincrby_calls(store.client)
    assert store.apply(tx) == []
    assert _hincrby_calls(store.client) - before == 1
    assert store.client.hmget(key, ["status", "spend_calls", "spend_tokens"]) == ['"succeeded"', "6", "30"]
    assert store.client.hget(other, "tokens") == "30"


def test_an_increment_is_not_folded_when_another_write_touches_its_field(store: RunStore) -> None:
    key = f"{store.keys.prefix}:step"
    store.client.hset(key, mapping={"fence": "1", "n": "4"})
    tx = Tx()
    tx.require("fence", key, "fence", "eq", 1)
    tx.hset(key, {"n": 10})
    tx.call("HINCRBY", key, "n", 1)  # after the HSET, as written: 11 (a fold would have lost the order)
    store.apply(tx)
    assert store.client.hget(key, "n") == "11"
    rejected = Tx()
    rejected.require("fence", key, "fence", "eq", 2)  # fails: nothing is written, folded or not
    rejected.hset(key, {"x": 1})
    rejected.call("HINCRBY", key, "n", 5)
    with pytest.raises(TxRejected):
        store.apply(rejected)
    assert store.client.hget(key, "n") == "11" and store.client.hget(key, "x") is None
