"""The memorization worker when recording a batch's outcomes fails, and recovery after it."""

from __future__ import annotations

import json
import shutil

import pytest

from expert_store.registry import FactRecord, JobRecord, SQLiteRegistry
from model.config import MemoryConfig, TrainConfig
from model.memorize import Memorizer
from model.memory_runtime import load_memory
from model.reference import ReferenceServing
from server.worker import MemorizationWorker, OutcomesNotRecorded
from tests.model.conftest import DATA


class RegistryThatFailsOnce(SQLiteRegistry):
    """Its first write of a `memorized` outcome fails (Redis or the disk going away)."""

    failed = False

    def update(self, owner, **changes):
        if changes.get("status") == "memorized" and not self.failed:
            self.failed = True
            raise ConnectionError("the registry went away")
        return super().update(owner, **changes)


def _one_fact_worker(reference, router_dir, tmp_path, registry: SQLiteRegistry):
    """A worker over a fresh store, with one CounterFact fact queued under one job."""
    row = json.loads(DATA.read_text().splitlines()[3])
    shutil.copytree(router_dir, tmp_path / "router")
    memory = load_memory(tmp_path / "store", tmp_path / "router", MemoryConfig(),
                         reference.d_model)
    reference.attach(memory)
    owner = registry.new_owner()
    job = JobRecord.new([owner])
    registry.put(FactRecord(owner=owner, kind="completion", job_id=job.id, payload={
        "prompt": row["prompt"], "completion": row["target_new"], "subject": row["subject"]}))
    registry.put_job(job)
    worker = MemorizationWorker(Memorizer(reference, memory, TrainConfig()), registry,
                                ReferenceServing(reference), max_len=512, batch_size=8)
    return worker, memory, owner, job


def test_outcomes_not_recorded_are_settled_by_recovery_not_marked_failed(
        reference, router_dir, tmp_path):
    registry = RegistryThatFailsOnce(str(tmp_path / "registry.sqlite3"))
    worker, memory, owner, job = _one_fact_worker(reference, router_dir, tmp_path, registry)

    with pytest.raises(OutcomesNotRecorded):
        worker.process([job])
    assert registry.get(owner).status == "training"  # not "failed" with its expert served
    assert len(memory.store.allocated_ids()) == 1

    worker.recover()  # what run_forever does next
    assert registry.get(owner).status == "queued" and len(memory.store.allocated_ids()) == 0
    assert registry.pop_job(0) == job.id  # requeued: it had started and never finished
    worker.process([registry.get_job(job.id)])
    fact = registry.get(owner)
    assert fact.status == "memorized" and len(fact.expert_ids) == 1


def test_a_job_taken_off_the_queue_but_never_started_is_queued_again(
        reference, router_dir, tmp_path):
    """The worker popped the job and stopped before marking it started."""
    registry = SQLiteRegistry(str(tmp_path / "registry.sqlite3"))
    worker, _, owner, job = _one_fact_worker(reference, router_dir, tmp_path, registry)
    registry.push_job(job.id)
    assert registry.pop_job(0) == job.id and registry.get_job(job.id).started_at is None

    worker.recover()
    worker.recover()  # twice: still queued once
    assert registry.queued_job_ids() == {job.id}
    assert registry.pop_job(0) == job.id and registry.pop_job(0) is None
    assert registry.get(owner).status == "queued"
