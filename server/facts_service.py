"""Facts: admission, jobs, listing, deletion, provenance.

With the default in-process worker (server/worker.py), memorization runs in a thread of this
process: training runs in torch (which releases the GIL) while the event loop keeps serving.
With an external worker (`mome worker`), this process only admits facts and follows the
store versions the worker announces on Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch

from expert_store.registry import FactRecord, JobRecord, Registry, fact_id_of, owner_of_fact_id
from expert_store.store import FREE
from model.facts import FactError, encode_fact
from model.memorize import Memorizer
from model.memory_layer import RequestWords
from model.relation_key import relation_positions
from model.turn_scope import in_scope_rows
from server.engine import GenerationEngine
from server.errors import APIError
from server.facts_protocol import FactIn, FactList, FactOut, FactsAccepted, JobOut
from server.serving_link import EngineLink
from server.worker import FactBusy, MemorizationWorker

logger = logging.getLogger(__name__)


class FactsService:
    def __init__(self, engine: GenerationEngine, memorizer: Memorizer, registry: Registry,
                 max_len: int, batch_size: int, provenance: bool = True,
                 external_worker: bool = False):
        self.engine = engine
        self.memorizer = memorizer
        self.memory = memorizer.memory
        self.store = memorizer.store
        self.registry = registry
        self.tokenizer = memorizer.ref.tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        self.provenance_enabled = provenance
        self.external_worker = external_worker
        self.worker: MemorizationWorker | None = None  # the in-process one, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe = None

    # ---- life cycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow the external worker's versions, or start the in-process worker (which
        recovers in its own thread: the event loop must stay free to serve its publishes)."""
        self._loop = loop
        if self.external_worker:
            self._unsubscribe = self.registry.subscribe_versions(self._on_version)
            return
        self.worker = MemorizationWorker(self.memorizer, self.registry,
                                         EngineLink(self.engine, loop, self.registry),
                                         self.max_len, self.batch_size)
        self.worker.start()

    def stop(self) -> None:
        """Blocking (joins the worker): call it off the event loop, which the worker may be
        waiting on."""
        if self.worker is not None:
            self.worker.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()

    def _on_version(self, version: int) -> None:
        """A store version announced by the external worker: serve it."""
        self.memory.refresh()
        asyncio.run_coroutine_threadsafe(self.engine.refresh_memory(), self._loop)

    # ---- admission --------------------------------------------------------------------------

    def submit(self, facts: list[FactIn]) -> FactsAccepted:
        """Validate every fact, then queue them all as one job (all or nothing). Blocking
        (tokenizes, writes the registry): called off the event loop."""
        for i, fact in enumerate(facts):
            try:
                encode_fact(self.tokenizer, fact.payload(), self.max_len)
            except FactError as exc:
                raise APIError(f"facts[{i}]: {exc}", 422, param=f"facts.{i}") from exc
        job = JobRecord.new([])
        for fact in facts:
            owner = self.registry.new_owner()
            self.registry.put(FactRecord(owner=owner, kind=fact.kind, payload=fact.payload(),
                                         job_id=job.id))
            job.owners.append(owner)
        self.registry.put_job(job)
        self.registry.push_job(job.id)
        return FactsAccepted(job_id=job.id, fact_ids=[fact_id_of(o) for o in job.owners])

    # ---- reading ----------------------------------------------------------------------------

    def job(self, job_id: str) -> JobOut:
        job = self.registry.get_job(job_id)
        if job is None:
            raise APIError(f"no job {job_id!r}", 404, param="job_id")
        statuses = [(f.status if f else "deleted") for f in map(self.registry.get, job.owners)]
        done = job.finished_at is not None
        elapsed = (job.finished_at or time.time()) - job.started_at if job.started_at else None
        return JobOut(
            id=job.id, status="done" if done else ("running" if job.started_at else "queued"),
            total=len(job.owners), memorized=statuses.count("memorized"),
            failed=statuses.count("failed"), superseded=statuses.count("superseded"),
            pending=statuses.count("queued") + statuses.count("training"),
            fact_ids=[fact_id_of(o) for o in job.owners], created_at=job.created_at,
            finished_at=job.finished_at,
            seconds_per_fact=(elapsed / len(job.owners)) if done and elapsed else None,
        )

    @staticmethod
    def to_out(fact: FactRecord) -> FactOut:
        return FactOut(id=fact.id, kind=fact.kind, status=fact.status, fact=fact.payload,
                       job_id=fact.job_id, experts=fact.expert_ids, steps=fact.steps,
                       loss=fact.loss, error=fact.error, replaced_by=fact.replaced_by,
                       created_at=fact.created_at,
                       updated_at=fact.updated_at)

    def get(self, fact_id: str) -> FactRecord:
        owner = owner_of_fact_id(fact_id)
        fact = self.registry.get(owner) if owner is not None else None
        if fact is None:
            raise APIError(f"no fact {fact_id!r}", 404, param="fact_id")
        return fact

    def list(self, limit: int, after: str | None, status: str | None) -> FactList:
        after_owner = None
        if after is not None and (after_owner := owner_of_fact_id(after)) is None:
            raise APIError(f"after: {after!r} is not a fact id", 400, param="after")
        records, more = self.registry.page(limit, after_owner, status)
        data = [self.to_out(r) for r in records]
        return FactList(data=data, has_more=more, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    def memory_info(self) -> dict:
        files = [f for f in self.store.path.rglob("*") if f.is_file()]
        return {"config": self.memory.cfg.to_dict(), "train": self.memorizer.cfg.__dict__,
                "experts": len(self.store), "index": self.store.index_kind,
                "store_version": self.store.version,
                "served_version": self.engine.served_version,
                "store_bytes": sum(f.stat().st_size for f in files),
                "router": self.memory.router.fingerprint()}

    # ---- deletion ---------------------------------------------------------------------------

    async def delete(self, fact_id: str) -> None:
        fact = self.get(fact_id)
        busy = APIError(f"fact {fact_id} is being memorized right now; delete it when its job "
                        "is done", 409)
        if not self.external_worker:
            if self.worker is None:
                raise APIError("the memorization worker is still starting; retry shortly", 503)
            try:
                await asyncio.to_thread(self.worker.delete, fact.owner)
            except FactBusy:
                raise busy from None
            return
        # External worker: a fact it claims after this check and finds deleted when it is done
        # loses its experts there (MemorizationWorker._record).
        if fact.status == "training":
            raise busy
        self.registry.delete(fact.owner)
        if await asyncio.to_thread(self.store.free, self.store.ids_of_owner(fact.owner)):
            self.memory.refresh()
            version = await self.engine.refresh_memory()
            self.registry.publish_version(version)

    # ---- provenance -------------------------------------------------------------------------

    def fired_owners(self, token_ids: list[int], prompt_len: int) -> set[int]:
        """Owners of the experts that fire anywhere on these tokens (a prompt of `prompt_len`
        tokens and output), recomputed here with the lower layers (for what the engine's
        fired log could not see, model/fired_log.py), under the same second keys."""
        if not len(self.store) or not token_ids:
            return set()
        ids = torch.tensor([token_ids])
        h, _ = self.memorizer.ref.lower(ids)
        # The view as the engine took it, from the prompt alone: output tokens keep theirs.
        h = torch.cat([self.memorizer.ref.routed(ids[:, :prompt_len], h[:, :prompt_len]),
                       h[:, prompt_len:]], dim=1)
        _, I = self.memory.route(h[0])
        scope = in_scope_rows(ids, self.memory.turn_marker)  # as served: this turn only
        if scope is not None:
            I[~scope[0].numpy()] = -1
        rows, cols = np.nonzero(I >= 0)
        words = np.array(relation_positions(token_ids[:prompt_len], self.memorizer.ref.tokenizer,
                                            self.memory.turn_marker), dtype=np.int64)
        _, fired = self.memory.second_keys(h[0], rows, I[rows, cols], [RequestWords(
            0, len(token_ids), total=len(words), rows=words, positions=words)])
        self.memory.take_units()
        return set(self.store.owner_of(np.unique(fired)).tolist()) if len(fired) else set()

    @staticmethod
    def fact_ids(owners: set[int]) -> list[str]:
        return [fact_id_of(o) for o in sorted(owners - {FREE})]
