"""Facts: admission, the in-process memorization worker, jobs, deletion, provenance, recovery.

The worker is a thread: training runs in torch (which releases the GIL) while the event
loop keeps serving. Each batch is committed to the store first (experts tagged with their
fact's owner number), then the registry records the outcome; on start-up, `recover` frees
experts whose fact never reached "memorized" and queues those facts again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from expert_store.registry import FactRecord, Registry, fact_id_of, owner_of_fact_id
from expert_store.store import FREE
from model.facts import EncodedFact, FactError, encode_fact
from model.memorize import Memorizer
from server.engine import GenerationEngine
from server.errors import APIError
from server.facts_protocol import FactIn, FactOut, FactsAccepted, JobOut

logger = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    owners: list[int]
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


class FactsService:
    def __init__(self, engine: GenerationEngine, memorizer: Memorizer, registry: Registry,
                 max_len: int, batch_size: int, provenance: bool = True):
        self.engine = engine
        self.memorizer = memorizer
        self.memory = memorizer.memory
        self.store = memorizer.memory.store
        self.registry = registry
        self.tokenizer = memorizer.ref.tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        self.provenance_enabled = provenance
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._busy: set[int] = set()  # owners being trained right now

    # ---- life cycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.recover()
        self._thread = threading.Thread(target=self._work, name="mome-memorizer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)

    def recover(self) -> None:
        """Make store and registry agree after a restart or crash, and requeue unfinished facts."""
        memorized = {f.owner for f in self.registry.with_status("memorized")}
        ids = self.store.allocated_ids()
        orphans = ids[~np.isin(self.store.owner_of(ids), list(memorized) or [FREE])]
        if len(orphans):
            logger.warning("freeing %d experts of facts that never finished", len(orphans))
            self.store.free(orphans)
        unfinished = [f.owner for f in self.registry.with_status("queued", "training")]
        if unfinished:
            for owner in unfinished:
                self.registry.update(owner, status="queued", expert_ids=[])
            self._enqueue(unfinished)

    # ---- admission --------------------------------------------------------------------------

    def submit(self, facts: list[FactIn]) -> FactsAccepted:
        """Validate every fact, then queue them all as one job (all or nothing)."""
        for i, fact in enumerate(facts):
            try:
                encode_fact(self.tokenizer, fact.payload(), self.max_len)
            except FactError as exc:
                raise APIError(f"facts[{i}]: {exc}", 422, param=f"facts.{i}") from exc
        owners = []
        for fact in facts:
            owner = self.registry.new_owner()
            self.registry.put(FactRecord(owner=owner, kind=fact.kind, payload=fact.payload()))
            owners.append(owner)
        job = self._enqueue(owners)
        return FactsAccepted(job_id=job.id, fact_ids=[fact_id_of(o) for o in owners])

    def _enqueue(self, owners: list[int]) -> Job:
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", owners=owners)
        for owner in owners:
            self.registry.update(owner, job_id=job.id)
        self.jobs[job.id] = job
        self._queue.put(job.id)
        return job

    # ---- reading ----------------------------------------------------------------------------

    def job(self, job_id: str) -> JobOut:
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(f"no job {job_id!r}", 404, param="job_id")
        statuses = [(f.status if f else "deleted") for f in map(self.registry.get, job.owners)]
        done = job.finished_at is not None
        memorized = statuses.count("memorized")
        elapsed = (job.finished_at or time.time()) - job.started_at if job.started_at else None
        return JobOut(
            id=job.id, status="done" if done else ("running" if job.started_at else "queued"),
            total=len(job.owners), memorized=memorized, failed=statuses.count("failed"),
            pending=statuses.count("queued") + statuses.count("training"),
            fact_ids=[fact_id_of(o) for o in job.owners], created_at=job.created_at,
            finished_at=job.finished_at,
            seconds_per_fact=(elapsed / len(job.owners)) if done and elapsed else None,
        )

    @staticmethod
    def to_out(fact: FactRecord) -> FactOut:
        return FactOut(id=fact.id, kind=fact.kind, status=fact.status, fact=fact.payload,
                       job_id=fact.job_id, experts=fact.expert_ids, steps=fact.steps,
                       loss=fact.loss, error=fact.error, created_at=fact.created_at,
                       updated_at=fact.updated_at)

    def get(self, fact_id: str) -> FactRecord:
        owner = owner_of_fact_id(fact_id)
        fact = self.registry.get(owner) if owner is not None else None
        if fact is None:
            raise APIError(f"no fact {fact_id!r}", 404, param="fact_id")
        return fact

    # ---- deletion ---------------------------------------------------------------------------

    async def delete(self, fact_id: str) -> None:
        fact = self.get(fact_id)
        if fact.owner in self._busy:
            raise APIError(f"fact {fact_id} is being memorized right now; delete it when its "
                           "job is done", 409)
        freed = await asyncio.to_thread(self.store.free, self.store.ids_of_owner(fact.owner))
        self.registry.delete(fact.owner)
        if freed:
            await self._publish_async()

    # ---- provenance -------------------------------------------------------------------------

    def provenance(self, token_ids: list[int]) -> list[str]:
        """Ids of the memorized facts whose experts fire anywhere on these tokens."""
        if not self.provenance_enabled or not len(self.store) or not token_ids:
            return []
        h, _ = self.memorizer.ref.lower(torch.tensor([token_ids]))
        _, I = self.memory.route(h[0])
        fired = I[I >= 0]
        if not len(fired):
            return []
        owners = sorted(set(self.store.owner_of(np.unique(fired)).tolist()) - {FREE})
        return [fact_id_of(o) for o in owners]

    # ---- the worker -------------------------------------------------------------------------

    async def _publish_async(self) -> None:
        version = await self.engine.refresh_memory()
        self.registry.publish_version(version)

    def _publish(self) -> None:
        asyncio.run_coroutine_threadsafe(self._publish_async(), self._loop).result()

    def _verify(self, facts: list[EncodedFact]) -> list[str]:
        async def run_all():
            return await asyncio.gather(*(
                self.engine.greedy(f.prompt_ids, len(f.answer_ids) + 1) for f in facts))

        return asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            job = self.jobs[job_id]
            job.started_at = time.time()
            for start in range(0, len(job.owners), self.batch_size):
                try:
                    self._memorize_batch(job.owners[start:start + self.batch_size])
                except Exception as exc:  # a failed batch must not stop the worker
                    logger.exception("memorization batch failed")
                    for owner in job.owners[start:start + self.batch_size]:
                        if (fact := self.registry.get(owner)) and fact.status != "memorized":
                            self.registry.update(owner, status="failed", error=str(exc))
            job.finished_at = time.time()

    def _memorize_batch(self, owners: list[int]) -> None:
        facts = [f for f in map(self.registry.get, owners) if f is not None]  # deleted: skip
        if not facts:
            return
        encoded = [encode_fact(self.tokenizer, f.payload, self.max_len) for f in facts]
        self._busy = {f.owner for f in facts}
        try:
            for f in facts:
                self.registry.update(f.owner, status="training")
            outcomes = self.memorizer.memorize([f.owner for f in facts], encoded,
                                               publish=self._publish, verify=self._verify)
        finally:
            self._busy = set()
        for outcome in outcomes:
            self.registry.update(
                outcome.owner, status="memorized" if outcome.memorized else "failed",
                expert_ids=outcome.expert_ids, steps=outcome.steps, loss=outcome.loss,
                error=outcome.error)
