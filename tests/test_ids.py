"""Buffered random UUIDs (teamster.orchestrator.ids): the same ids as uuid.uuid4, one os.urandom read per block."""

from __future__ import annotations

import importlib
import os
import threading
import uuid

import pytest
from celery.utils import uuid as celery_uuid

from teamster.config.settings import load_settings
from teamster.errors import InvalidSettings
from teamster.orchestrator import ids

kombu_uuid = importlib.import_module("kombu.utils.uuid")


def test_ids_are_random_version_4_uuids_and_never_repeat() -> None:
    made = [ids.uuid4() for _ in range(20_000)]
    assert len(set(made)) == len(made)
    for value in made[:300]:
        assert value.version == 4 and value.variant == uuid.RFC_4122
        assert uuid.UUID(str(value)) == value


def test_threads_never_get_the_same_bytes() -> None:
    made: list[list[uuid.UUID]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def make(out: list[uuid.UUID]) -> None:
        start.wait()
        out.extend(ids.uuid4() for _ in range(3_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for out in made for value in out]
    assert len(everything) == 24_000 and len(set(everything)) == 24_000


def test_a_block_is_read_from_os_urandom_once_per_block_of_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.urandom

    def counting(size: int) -> bytes:
        reads.append(size)
        return real(size)

    monkeypatch.setattr(ids.os, "urandom", counting)
    block = ids._Block(64)  # four ids per read
    taken = [block.take16() for _ in range(12)]
    assert reads == [64, 64, 64]
    assert len(set(taken)) == 12 and all(len(part) == 16 for part in taken)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_its_parents_block() -> None:
    ids.uuid4()  # the parent now holds a block it has barely used
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: without the reset it would hand out exactly the parent's next ids
        try:
            os.write(writer, "".join(ids.uuid4().hex for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    child = {text[i:i + 32] for i in range(0, len(text), 32)}
    parent = {ids.uuid4().hex for _ in range(5)}
    assert len(child) == 5 and not child & parent


def test_install_makes_it_the_processs_uuid4_and_kombus_and_uninstall_gives_them_back() -> None:
    original = uuid.uuid4
    assert not ids.installed()
    try:
        ids.install()
        assert ids.installed() and uuid.uuid4 is ids.uuid4
        assert kombu_uuid.uuid.__defaults__ == (ids.uuid4,)  # Celery's task ids and kombu's delivery tags
        assert celery_uuid is kombu_uuid.uuid
        assert uuid.UUID(celery_uuid()).version == 4
        ids.install()  # twice is once
        assert kombu_uuid.uuid.__defaults__ == (ids.uuid4,)
    finally:
        ids.uninstall()
    assert uuid.uuid4 is original and not ids.installed()
    assert kombu_uuid.uuid.__defaults__ == (original,)


def test_workers_buffer_ids_unless_told_not_to() -> None:
    assert load_settings().worker_buffered_uuids is True
    assert load_settings(worker_buffered_uuids="false").worker_buffered_uuids is False
    with pytest.raises(InvalidSettings, match="TEAMSTER_WORKER_BUFFERED_UUIDS"):
        load_settings(worker_buffered_uuids="sometimes")
