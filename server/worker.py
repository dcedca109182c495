"""The memorization worker: takes jobs from the registry's queue and memorizes their facts.

It runs as a thread inside the server (the default) or as its own process (`mome worker`,
with the registry in Redis and the store on a shared volume). Only what it does after a
commit differs: `publish` makes the serving engine load the new store version, and
`verify` asks the serving path for greedy answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from expert_store.registry import FactRecord, JobRecord, Registry, fact_id_of
from expert_store.store import FREE
from model.facts import EncodedFact, encode_fact
from model.memorize import Memorizer

logger = logging.getLogger(__name__)


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
    def __init__(self, memorizer: Memorizer, registry: Registry, max_len: int, batch_size: int,
                 publish: Callable[[], None], verify: Callable[[list[EncodedFact]], list[str]]):
        self.memorizer = memorizer
        self.store = memorizer.memory.store
        self.registry = registry
        self.max_len = max_len
        self.batch_size = batch_size
        self.publish = publish
        self.verify = verify
        self.busy: set[int] = set()  # owners being trained right now
        self._stop = threading.Event()

    def recover(self) -> None:
        """Make store and registry agree after a restart or crash; requeue unfinished facts."""
        memorized = {f.owner for f in self.registry.with_status("memorized")}
        ids = self.store.allocated_ids()
        owners = self.store.owner_of(ids)
        orphans = ids[~np.isin(owners, list(memorized) or [FREE])]
        if len(orphans):
            logger.warning("freeing %d experts of facts that never finished", len(orphans))
            self.store.free(orphans)
            self.publish()
        # A fact whose experts were set aside for a replacement that never finished.
        lost = sorted(memorized - set(owners.tolist()))
        if lost:
            logger.warning("memorizing %d facts again: their experts are gone", len(lost))
            for owner in lost:
                self.registry.update(owner, status="queued", expert_ids=[])
            job = JobRecord.new(lost)
            self.registry.put_job(job)
            self.registry.push_job(job.id)
        interrupted = set()
        for fact in self.registry.with_status("queued", "training"):
            if fact.status == "training":
                self.registry.update(fact.owner, status="queued", expert_ids=[])
            job = self.registry.get_job(fact.job_id) if fact.job_id else None
            if job and job.started_at is not None and job.finished_at is None:
                interrupted.add(job.id)  # taken off the queue when the worker stopped
        for job_id in sorted(interrupted):
            self.registry.push_job(job_id)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            job_id = self.registry.pop_job(timeout=1.0)
            if job_id is not None:
                self.process(gather_jobs(self.registry, job_id, self.batch_size))

    def stop(self) -> None:
        self._stop.set()

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
            except Exception as exc:  # a failed batch must not stop the worker
                logger.exception("memorization batch failed")
                for owner in batch:
                    if (fact := self.registry.get(owner)) and fact.status != "memorized":
                        self.registry.update(owner, status="failed", error=str(exc))
        for job in jobs:
            job.finished_at = time.time()
            self.registry.put_job(job)

    def _memorize_batch(self, owners: list[int]) -> None:
        # Deleted facts are skipped; memorized ones (a requeued job) are not trained again.
        facts = [f for f in map(self.registry.get, owners) if f and f.status == "queued"]
        if not facts:
            return
        encoded = [encode_fact(self.memorizer.ref.tokenizer, f.payload, self.max_len)
                   for f in facts]
        facts, encoded = self._latest_per_prompt(facts, encoded)
        self.busy = {f.owner for f in facts}
        try:
            for f in facts:
                self.registry.update(f.owner, status="training")
            outcomes = self.memorizer.memorize([f.owner for f in facts], encoded,
                                               publish=self.publish, verify=self.verify,
                                               recall=self._recall)
        finally:
            self.busy = set()
        for outcome in outcomes:
            self.registry.update(
                outcome.owner, status="memorized" if outcome.memorized else "failed",
                expert_ids=outcome.expert_ids, steps=outcome.steps, loss=outcome.loss,
                error=outcome.error)
            # The replaced facts may have been deleted meanwhile (they were not busy).
            for old in outcome.replaced:
                if self.registry.get(old):
                    self.registry.update(old, status="superseded", expert_ids=[],
                                         replaced_by=fact_id_of(outcome.owner))
            for old, expert_ids in outcome.restored.items():
                if self.registry.get(old):
                    self.registry.update(old, expert_ids=expert_ids)
                elif self.store.free(np.array(expert_ids)):
                    self.publish()

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
    commit it publishes the store version and waits until the server serves it, then
    verifies the facts through the server's own API.
    """
    from client.sdk import MomeClient
    from model.backbone import resolve_model_dir
    from server.memory_setup import admin_key, build_memorizer
    from server.settings import ServerSettings

    settings = ServerSettings()
    if not settings.redis_url:
        raise SystemExit("mome worker needs MOME_REDIS_URL (the registry it shares with the server)")
    model_dir = resolve_model_dir(settings.model)
    memorizer, _, registry = build_memorizer(settings, model_dir)
    client = MomeClient(server_url, api_key=admin_key(settings))

    def publish() -> None:
        version = memorizer.memory.store.version
        registry.publish_version(version)
        deadline = time.monotonic() + 120
        while client.request("GET", "/v1/memory")["served_version"] < version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not load store version {version}")
            registry.publish_version(version)  # a notice can be missed across a reconnect
            time.sleep(0.2)

    def verify(facts: list[EncodedFact]) -> list[str]:
        answers = []
        for fact in facts:
            p = fact.payload
            max_tokens = len(fact.answer_ids) + 1
            if fact.kind == "completion":
                out = client.complete(p["prompt"], temperature=0, max_tokens=max_tokens)
                answers.append(out["choices"][0]["text"])
            else:
                messages = p.get("messages") or [{"role": "user", "content": p["question"]}]
                out = client.chat(messages, temperature=0, max_tokens=max_tokens)
                answers.append(out["choices"][0]["message"]["content"])
        return answers

    worker = MemorizationWorker(memorizer, registry, settings.max_model_len,
                                settings.train_batch_size, publish=publish, verify=verify)
    worker.recover()
    logger.info("memorization worker ready (server %s)", server_url)
    worker.run_forever()
