"""Both registry back-ends through one interface; Redis pub/sub between two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from expert_store.config import StoreConfig
from expert_store.registry import (
    FactRecord,
    JobRecord,
    RedisRegistry,
    SQLiteRegistry,
    fact_id_of,
    owner_of_fact_id,
)
from expert_store.store import ExpertStore


@pytest.fixture(params=["sqlite", "redis"])
def registry(request, tmp_path):
    if request.param == "sqlite":
        reg = SQLiteRegistry(str(tmp_path / "registry.sqlite3"))
        yield reg
    else:
        redis_server = request.getfixturevalue("redis_server")
        reg = RedisRegistry(redis_server.url)
        yield reg
    reg.close()


def test_crud(registry):
    owners = [registry.new_owner() for _ in range(3)]
    assert len(set(owners)) == 3 and owners == sorted(owners)
    for owner in owners:
        registry.put(FactRecord(owner=owner, kind="completion",
                                payload={"prompt": f"p{owner}", "completion": "c"}))
    assert [f.owner for f in registry.all()] == owners
    updated = registry.update(owners[1], status="memorized", expert_ids=[4, 5], steps=12,
                              loss=0.01)
    again = registry.get(owners[1])
    assert again == updated and again.expert_ids == [4, 5] and again.status == "memorized"
    assert again.updated_at >= again.created_at
    assert [f.owner for f in registry.with_status("memorized")] == [owners[1]]
    assert registry.delete(owners[0]) is True and registry.delete(owners[0]) is False
    assert registry.get(owners[0]) is None
    with pytest.raises(KeyError):
        registry.update(owners[0], status="failed")
    with pytest.raises(ValueError):
        registry.update(owners[1], created_at=0.0)


def test_finished_jobs_are_dropped_after_the_retention_and_running_ones_never(registry):
    registry.job_retention_s = 0.5
    running = JobRecord.new([1])
    running.started_at = time.time()
    registry.put_job(running)
    done = JobRecord.new([2])
    done.started_at = done.finished_at = time.time()
    registry.put_job(done)
    assert registry.get_job(done.id) == done
    time.sleep(1.0)
    registry.put_job(JobRecord.new([3]))  # queued, never expires
    last = JobRecord.new([4])
    last.finished_at = time.time()
    registry.put_job(last)  # SQLite drops expired records when a job finishes
    assert registry.get_job(done.id) is None
    assert registry.get_job(running.id) == running and registry.get_job(last.id) == last


def test_fact_ids_round_trip():
    assert owner_of_fact_id(fact_id_of(42)) == 42
    assert owner_of_fact_id("fact-x") is None and owner_of_fact_id("42") is None


def test_sqlite_registry_survives_reopen(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    reg = SQLiteRegistry(path)
    owner = reg.new_owner()
    reg.put(FactRecord(owner=owner, kind="chat", payload={"question": "q", "answer": "a"}))
    reg.close()
    reopened = SQLiteRegistry(path)
    assert reopened.get(owner).payload == {"question": "q", "answer": "a"}
    assert reopened.new_owner() == owner + 1


READER = textwrap.dedent("""
    import sys, time
    from expert_store.registry import RedisRegistry
    from expert_store.store import ExpertStore
    store = ExpertStore.open(sys.argv[1])
    registry = RedisRegistry(sys.argv[2])
    seen = []
    registry.subscribe_versions(lambda v: seen.append(v))
    print("ready", flush=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if seen and store.version < seen[-1]:
            store.refresh()
        if store.version >= 1 and seen:
            D, I = store.search(store.read_keys([0]), 1)
            print(f"version {store.version} owner {store.owner_of(I[0])[0]}", flush=True)
            break
        time.sleep(0.02)
""")


def test_two_processes_share_a_store_through_redis(tmp_path, redis_server):
    root = Path(__file__).resolve().parents[2]
    store = ExpertStore.open(tmp_path / "store", StoreConfig(d_k=4, value_shape=(2,)))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path / "store"), redis_server.url],
        stdout=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert reader.stdout.readline().strip() == "ready"
    assert store.version == 0
    time.sleep(0.2)  # let the subscription settle
    store.add(np.eye(4, dtype=np.float32)[:1], np.ones((1, 2), np.float32), 77)
    RedisRegistry(redis_server.url).publish_version(store.version)
    line = reader.stdout.readline().strip()
    reader.wait(timeout=30)
    assert line == "version 1 owner 77"


def test_job_queue_is_fifo_and_jobs_persist(registry):
    from expert_store.registry import JobRecord

    assert registry.pop_job(timeout=0.1) is None
    started = time.monotonic()
    assert registry.pop_job(timeout=0) is None  # 0: returns at once (Redis' 0 blocks forever)
    assert time.monotonic() - started < 0.5
    for name in ("job-a", "job-b"):
        registry.put_job(JobRecord(id=name, owners=[1, 2]))
        registry.push_job(name)
    registry.push_job("job-a")  # waiting already: not queued twice, nor moved
    assert registry.queued_job_ids() == {"job-a", "job-b"}
    assert registry.pop_job(timeout=1) == "job-a"
    assert registry.queued_job_ids() == {"job-b"}
    assert registry.pop_job(timeout=0) == "job-b"
    assert registry.pop_job(timeout=0.1) is None and registry.queued_job_ids() == set()
    job = registry.get_job("job-a")
    job.finished_at = 5.0
    registry.put_job(job)
    assert registry.get_job("job-a").finished_at == 5.0 and registry.get_job("nope") is None


def test_queued_jobs_are_gathered_up_to_a_batch(registry):
    """The worker trains single-fact jobs queued behind each other as one batch."""
    from expert_store.registry import JobRecord
    from server.worker import gather_jobs

    sizes = {"a": 1, "b": 1, "c": 3, "d": 1, "e": 1}
    for name, n in sizes.items():
        registry.put_job(JobRecord(id=name, owners=list(range(n))))
        registry.push_job(name)
    def gathered(max_facts: int) -> list[str]:
        return [job.id for job in gather_jobs(registry, registry.pop_job(timeout=1), max_facts)]

    assert gathered(max_facts=4) == ["a", "b", "c"]  # 5 facts: c tips it
    assert gathered(max_facts=1) == ["d"]
    assert gathered(max_facts=8) == ["e"]
    assert registry.pop_job(timeout=0) is None


def _second_handle(registry, tmp_path):
    """Another handle on the same registry, as another thread or process would hold."""
    if isinstance(registry, SQLiteRegistry):
        return SQLiteRegistry(str(tmp_path / "registry.sqlite3"))
    return RedisRegistry(registry.url)


def test_an_update_never_brings_a_deleted_fact_back(registry, tmp_path):
    # The worker updates a fact's status while an admin deletes it: once the delete has
    # happened, no update may write the fact again.
    import threading

    other = _second_handle(registry, tmp_path)
    resurrected = 0
    for round_ in range(40):
        owner = registry.new_owner()
        registry.put(FactRecord(owner=owner, kind="completion", payload={"prompt": "p"}))
        started = threading.Event()

        def keep_updating(owner=owner, started=started):
            deadline = time.monotonic() + 2  # bounded: the old code looped on forever
            while time.monotonic() < deadline:
                started.set()
                try:
                    other.update(owner, steps=1)
                    time.sleep(0.0002)  # the worker updates often, but not back to back
                except KeyError:
                    return

        thread = threading.Thread(target=keep_updating)
        thread.start()
        started.wait()
        time.sleep(0.001 * (round_ % 5))
        registry.delete(owner)
        thread.join(timeout=10)
        assert not thread.is_alive()
        resurrected += registry.get(owner) is not None
    other.close()
    assert resurrected == 0, f"{resurrected} of 40 deleted facts came back"


def test_facts_are_listed_in_pages(registry):
    owners = [registry.new_owner() for _ in range(7)]
    for i, owner in enumerate(owners):
        registry.put(FactRecord(owner=owner, kind="completion", payload={"prompt": f"p{i}"},
                                status="memorized" if i % 2 else "failed"))
    first, more = registry.page(limit=3)
    assert [f.owner for f in first] == owners[:3] and more
    rest, more = registry.page(limit=10, after=first[-1].owner)
    assert [f.owner for f in rest] == owners[3:] and not more
    memorized, _ = registry.page(limit=10, status="memorized")
    assert [f.owner for f in memorized] == owners[1::2]
