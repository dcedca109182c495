"""The memorization worker: owns the thread that takes jobs from the registry's queue,
recovery after a crash, and deletion of facts (which must not race with training).

The path of one fact: `FactsService.submit` (server/facts_service.py) queues it;
`MemorizationWorker.process` takes its job; `Memorizer.memorize` (model/memorize.py) trains,
commits and verifies it through a `Serving` link (server/serving_link.py); the outcome is
written to the registry here.

It runs as a thread inside the server (the default, `EngineLink`) or as its own process
(`mome worker`, `HttpLink`, with the registry in Redis and the store on a shared volume).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from expert_store.registry import FactRecord, JobRecord, Registry, fact_id_of
from expert_store.store import FREE
from model.facts import EncodedFact, encode_fact
from model.memorize import FactOutcome, Memorizer, Serving

logger = logging.getLogger(__name__)

RETRY_S = 2.0  # wait before asking an unreachable registry again


class FactBusy(RuntimeError):
    """The fact is being trained right now."""


class OutcomesNotRecorded(RuntimeError):
    """A memorized batch whose outcomes could not all be written to the registry."""


def gather_jobs(registry: Registry, first: str, max_facts: int) -> list[JobRecord]:
    """`first` and the jobs already queued behind it, while they hold at most `max_facts`
    facts in all (always at least `first`); jobs deleted meanwhile are left out.

    Facts posted one at a time by many clients (or by one that does not wait for each) are
    then trained together: a batch costs little more than a single fact.
    """
    jobs = [job] if (job := registry.get_job(first)) else []
    facts = sum(len(job.owners) for job in jobs)
    while facts < max_facts and (job_id := registry.pop_job(timeout=0)) is not None:
        if job := registry.get_job(job_id):
            jobs.append(job)
            facts += len(job.owners)
    return jobs


class MemorizationWorker:
    def __init__(self, memorizer: Memorizer, registry: Registry, serving: Serving,
                 max_len: int, batch_size: int):
        self.memorizer = memorizer
        self.store = memorizer.store
        self.registry = registry
        self.serving = serving
        self.max_len = max_len
        self.batch_size = batch_size
        self.busy: set[int] = set()  # owners being trained right now
        self._claim = threading.Lock()  # taking facts for training vs deleting them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover, then memorize queued jobs, in a thread of its own (never the event
        loop's: recovery publishes through it)."""
        self._thread = threading.Thread(target=self.run_forever, name="mome-memorizer",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        """Recover, then memorize jobs until stopped. Whatever fails on the way (the registry
        or the engine going away) is logged, waited out and followed by recovery again: a
        job taken off the queue is then put back, experts left by a half-recorded batch are
        freed."""
        recovered = False
        while not self._stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                job_id = self.registry.pop_job(timeout=1.0)
                if job_id is not None:
                    self.process(gather_jobs(self.registry, job_id, self.batch_size))
            except Exception:
                logger.exception("memorization worker: retrying in %.0f s", RETRY_S)
                recovered = False
                self._stop.wait(RETRY_S)

    # ---- recovery ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Make store and registry agree after a restart or crash; requeue unfinished facts."""
        memorized = {f.owner for f in self.registry.with_status("memorized")}
        failed = {f.owner for f in self.registry.with_status("failed")}
        if restored := self.memorizer.undo_interrupted_batch(memorized | failed):
            logger.warning("put back %d stored experts an interrupted batch had changed",
                           restored)
        ids = self.store.allocated_ids()
        owners = self.store.owner_of(ids)
        orphans = ids[~np.isin(owners, list(memorized) or [FREE])]
        if len(orphans):
            logger.warning("freeing %d experts of facts that never finished", len(orphans))
            self.store.free(orphans)
        # Serve the store as it is: the engine may have loaded it before the orphans went,
        # and rows freed before the crash wait for this confirmation to be reused.
        self.memorizer.publish(self.serving)
        # A fact whose experts were set aside for a replacement that never finished.
        lost = sorted(memorized - set(owners.tolist()))
        if lost:
            logger.warning("memorizing %d facts again: their experts are gone", len(lost))
            job = JobRecord.new(lost)
            self.registry.put_job(job)
            self.registry.push_job(job.id)
            # Queued under the new job, so a crash while it runs finds it again (a crash
            # before this line finds these facts lost again and queues another job).
            for owner in lost:
                self.registry.update(owner, status="queued", expert_ids=[], job_id=job.id)
        # Jobs taken off the queue and never finished (the worker stopped while running one,
        # or between taking it and marking it started) go back on it.
        waiting, interrupted = self.registry.queued_job_ids(), set()
        for fact in self.registry.with_status("queued", "training"):
            if fact.status == "training":
                self.registry.update(fact.owner, status="queued", expert_ids=[])
            job = self.registry.get_job(fact.job_id) if fact.job_id else None
            if job and job.finished_at is None and job.id not in waiting:
                interrupted.add(job.id)
        for job_id in sorted(interrupted):
            self.registry.push_job(job_id)

    # ---- deletion ---------------------------------------------------------------------------

    def delete(self, owner: int) -> None:
        """Delete a fact and free its experts; FactBusy while it trains."""
        with self._claim:
            if owner in self.busy:
                raise FactBusy(fact_id_of(owner))
            self.registry.delete(owner)
            freed = self.store.free(self.store.ids_of_owner(owner))
        if freed:
            self.memorizer.publish(self.serving)

    # ---- memorizing -------------------------------------------------------------------------

    def process(self, jobs: list[JobRecord]) -> None:
        """Memorize the facts of these jobs, in order, in batches of `batch_size`."""
        for job in jobs:
            if job.started_at is None:
                job.started_at = time.time()
            job.finished_at = None
            self.registry.put_job(job)
        owners = [owner for job in jobs for owner in job.owners]
        for start in range(0, len(owners), self.batch_size):
            batch = owners[start:start + self.batch_size]
            try:
                self._memorize_batch(batch)
            except OutcomesNotRecorded:
                raise  # run_forever recovers: the batch is settled from its journal
            except Exception as exc:  # a failed batch must not stop the worker
                logger.exception("memorization batch failed")
                self._fail(batch, str(exc))
            finally:
                with self._claim:
                    self.busy = set()
        for job in jobs:
            job.finished_at = time.time()
            self.registry.put_job(job)

    def _memorize_batch(self, owners: list[int]) -> None:
        facts = self._claim_queued(owners)
        if not facts:
            return
        encoded = [encode_fact(self.memorizer.ref.tokenizer, f.payload, self.max_len)
                   for f in facts]
        facts, encoded = self._latest_per_prompt(facts, encoded)
        outcomes = self.memorizer.memorize([f.owner for f in facts], encoded, self.serving,
                                           recall=self._recall)
        try:
            for outcome in outcomes:
                self._record(outcome)
        except Exception as exc:
            # Marking the rest failed would strand their verified experts: recovery frees
            # them and puts back the neighbours they were trained beside.
            raise OutcomesNotRecorded("recording a batch's outcomes failed") from exc
        self.memorizer.batch_recorded()

    def _claim_queued(self, owners: list[int]) -> list[FactRecord]:
        """The queued facts among `owners`, marked training (deleted and already memorized
        ones, from a requeued job, are skipped)."""
        claimed = []
        with self._claim:
            for fact in map(self.registry.get, owners):
                if fact is None or fact.status != "queued":
                    continue
                try:
                    claimed.append(self.registry.update(fact.owner, status="training"))
                except KeyError:  # deleted by another process meanwhile
                    continue
            self.busy = {f.owner for f in claimed}
        return claimed

    def _record(self, outcome: FactOutcome) -> None:
        """Write one fact's outcome; a fact deleted meanwhile (by another process) loses its
        experts instead."""
        try:
            self.registry.update(
                outcome.owner, status="memorized" if outcome.memorized else "failed",
                expert_ids=outcome.expert_ids, steps=outcome.steps, loss=outcome.loss,
                error=outcome.error)
        except KeyError:
            self._free_and_publish(outcome.expert_ids)
        # The replaced facts may have been deleted meanwhile (they were not busy).
        for old in outcome.replaced:
            try:
                self.registry.update(old, status="superseded", expert_ids=[],
                                     replaced_by=fact_id_of(outcome.owner))
            except KeyError:
                pass
        for old, expert_ids in outcome.restored.items():
            try:
                self.registry.update(old, expert_ids=expert_ids)
            except KeyError:
                self._free_and_publish(expert_ids)

    def _free_and_publish(self, expert_ids: list[int]) -> None:
        if self.store.free(np.array(expert_ids, dtype=np.int64)):
            self.memorizer.publish(self.serving)

    def _fail(self, owners: list[int], error: str) -> None:
        for owner in owners:
            fact = self.registry.get(owner)
            if fact is not None and fact.status in ("queued", "training"):
                try:
                    self.registry.update(owner, status="failed", error=error)
                except KeyError:
                    pass

    def _latest_per_prompt(self, facts: list[FactRecord], encoded: list[EncodedFact]):
        """Of the facts in one batch with the very same prompt, only the last posted is
        trained; the earlier ones are superseded by it."""
        prompts = [tuple(e.prompt_ids) for e in encoded]
        last = {prompt: f.owner for f, prompt in zip(facts, prompts)}
        keep = []
        for i, (f, prompt) in enumerate(zip(facts, prompts)):
            if last[prompt] == f.owner:
                keep.append(i)
            else:
                self.registry.update(f.owner, status="superseded",
                                     replaced_by=fact_id_of(last[prompt]))
        return [facts[i] for i in keep], [encoded[i] for i in keep]

    def _recall(self, owners: list[int]) -> list[EncodedFact | None]:
        """Memorized facts by owner, encoded as they were trained (None if gone)."""
        out = []
        for record in map(self.registry.get, owners):
            if record is None or record.status != "memorized":
                out.append(None)
                continue
            out.append(encode_fact(self.memorizer.ref.tokenizer, record.payload, self.max_len))
        return out


def run_worker_process(server_url: str) -> None:
    """`mome worker`: memorize jobs from Redis for the server at `server_url`.

    Shares the store directory (a volume) and the Redis registry with the server; after each
    commit it announces the store version and waits until the server serves it, then
    verifies the facts through the server's own API.
    """
    from model.backbone import resolve_model_dir
    from server.memory_setup import admin_key, build_memorizer
    from server.serving_link import HttpLink
    from server.settings import ServerSettings

    settings = ServerSettings()
    if not settings.redis_url:
        raise SystemExit("mome worker needs MOME_REDIS_URL (the registry it shares with the server)")
    model_dir = resolve_model_dir(settings.model)
    memorizer, _, registry = build_memorizer(settings, model_dir)
    link = HttpLink(server_url, admin_key(settings), registry)
    worker = MemorizationWorker(memorizer, registry, link, settings.max_model_len,
                                settings.train_batch_size)
    logger.info("memorization worker ready (server %s)", server_url)
    worker.run_forever()
