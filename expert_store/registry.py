"""Registry of facts: which fact owns which experts, its text, status, steps, loss, timestamps.

Two back-ends behind one interface: `SQLiteRegistry` (a file beside the store, the default) and
`RedisRegistry` (for several processes; it also publishes each new store version).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

logger = logging.getLogger(__name__)

STATUSES = ("queued", "training", "memorized", "failed", "superseded")


@dataclass
class FactRecord:
    owner: int  # the integer tag the store keeps on each of this fact's experts
    kind: str  # "chat" or "completion"
    payload: dict  # the fact as posted (messages/question/prompt, answer/completion, subject)
    status: str = "queued"
    job_id: str | None = None
    expert_ids: list[int] = field(default_factory=list)
    steps: int = 0
    loss: float | None = None
    error: str | None = None
    replaced_by: str | None = None  # the later fact with the same prompt (status superseded)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return fact_id_of(self.owner)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> FactRecord:
        return cls(**json.loads(text))


@dataclass
class JobRecord:
    """A batch of facts posted together; the worker takes jobs in order."""

    id: str
    owners: list[int]
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def new(cls, owners: list[int]) -> JobRecord:
        return cls(id=f"job-{uuid.uuid4().hex[:16]}", owners=owners)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls(**json.loads(text))


def fact_id_of(owner: int) -> str:
    return f"fact-{owner}"


def owner_of_fact_id(fact_id: str) -> int | None:
    prefix, _, number = fact_id.partition("-")
    return int(number) if prefix == "fact" and number.isdigit() else None


REDIS_TIMEOUT_S = 10.0
_UPDATABLE = {f.name for f in fields(FactRecord)} - {"owner", "created_at"}


class Registry(ABC):
    @abstractmethod
    def new_owner(self) -> int:
        """A fresh, never reused owner number."""

    @abstractmethod
    def put(self, fact: FactRecord) -> None: ...

    @abstractmethod
    def get(self, owner: int) -> FactRecord | None: ...

    @abstractmethod
    def all(self) -> list[FactRecord]:
        """Every fact, oldest first."""

    @abstractmethod
    def delete(self, owner: int) -> bool: ...

    # Jobs: records plus a FIFO queue that the memorization worker (thread or process) pops.
    # A finished job's record is dropped this long after it finished (None: kept forever);
    # its facts keep their outcome, only GET /v1/jobs/{id} then answers 404.
    job_retention_s: float | None = None

    @abstractmethod
    def put_job(self, job: JobRecord) -> None: ...

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def push_job(self, job_id: str) -> None:
        """Queue a job, unless it is waiting already (a submit and a recovery may both push
        it)."""

    @abstractmethod
    def pop_job(self, timeout: float) -> str | None:
        """The oldest queued job id, waiting up to `timeout` seconds (0: not at all); None if
        there is none."""

    @abstractmethod
    def queued_job_ids(self) -> set[str]:
        """The job ids waiting in the queue now."""

    def update(self, owner: int, **changes) -> FactRecord:
        """Change some fields of a fact, atomically: a fact deleted meanwhile stays deleted
        (KeyError), and two updates never lose each other's fields."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")

        def apply(fact: FactRecord) -> FactRecord:
            for name, value in changes.items():
                setattr(fact, name, value)
            fact.updated_at = time.time()
            return fact

        return self._read_modify_write(owner, apply)

    @abstractmethod
    def _read_modify_write(self, owner: int, apply: Callable[[FactRecord], FactRecord]
                           ) -> FactRecord:
        """Replace fact `owner` by `apply(fact)` in one atomic step; KeyError if it is gone."""

    def with_status(self, *statuses: str) -> list[FactRecord]:
        return [f for f in self.all() if f.status in statuses]

    def page(self, limit: int, after: int | None = None,
             status: str | None = None) -> tuple[list[FactRecord], bool]:
        """Up to `limit` facts with owners above `after`, oldest first, and whether more
        follow."""
        facts = [f for f in self.all()
                 if (after is None or f.owner > after) and (status is None or f.status == status)]
        return facts[:limit], len(facts) > limit

    # Store-version notices: a no-op for a single process; Redis broadcasts them.
    def publish_version(self, version: int) -> None:  # noqa: B027
        pass

    def subscribe_versions(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call `callback(version)` on each notice; returns a function that unsubscribes."""
        return lambda: None

    def close(self) -> None:  # noqa: B027
        pass


class SQLiteRegistry(Registry):
    def __init__(self, path: str):
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS facts (owner INTEGER PRIMARY KEY, body TEXT)")
        self._conn.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INT)")
        self._conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, body TEXT)")
        self._conn.execute("CREATE TABLE IF NOT EXISTS job_queue (seq INTEGER PRIMARY KEY "
                           "AUTOINCREMENT, id TEXT)")
        self._lock = threading.Lock()
        self._purged_at = float("-inf")  # see _purge_due

    def new_owner(self) -> int:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT value FROM counters WHERE name='owner'").fetchone()
            owner = (row[0] if row else 0) + 1
            self._conn.execute("INSERT OR REPLACE INTO counters VALUES ('owner', ?)", (owner,))
            self._conn.execute("COMMIT")
            return owner

    def put(self, fact: FactRecord) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO facts VALUES (?, ?)",
                               (fact.owner, fact.to_json()))

    def get(self, owner: int) -> FactRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM facts WHERE owner=?", (owner,)).fetchone()
        return FactRecord.from_json(row[0]) if row else None

    def _read_modify_write(self, owner, apply):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT body FROM facts WHERE owner=?",
                                         (owner,)).fetchone()
                if row is None:
                    raise KeyError(fact_id_of(owner))
                fact = apply(FactRecord.from_json(row[0]))
                self._conn.execute("UPDATE facts SET body=? WHERE owner=?",
                                   (fact.to_json(), owner))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return fact

    def page(self, limit, after=None, status=None):
        query, args = "SELECT body FROM facts WHERE owner > ?", [after or 0]
        if status is not None:
            query += " AND json_extract(body, '$.status') = ?"
            args.append(status)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY owner LIMIT ?",
                                      (*args, limit + 1)).fetchall()
        return [FactRecord.from_json(r[0]) for r in rows[:limit]], len(rows) > limit

    def all(self) -> list[FactRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT body FROM facts ORDER BY owner").fetchall()
        return [FactRecord.from_json(r[0]) for r in rows]

    def delete(self, owner: int) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM facts WHERE owner=?", (owner,)).rowcount > 0

    def put_job(self, job: JobRecord) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (job.id, job.to_json()))
            if job.finished_at is not None and self._purge_due():
                self._conn.execute(
                    "DELETE FROM jobs WHERE json_extract(body, '$.finished_at') < ?",
                    (time.time() - self.job_retention_s,))

    def _purge_due(self) -> bool:
        """Whether finished jobs past the retention are dropped now. The purge scans every
        job, so it runs at most every tenth of the retention (and at least every minute):
        once per finished job it cost 9 ms per job at 10,000 jobs, growing with the table."""
        if self.job_retention_s is None:
            return False
        now = time.monotonic()
        if now - self._purged_at < min(60.0, self.job_retention_s / 10):
            return False
        self._purged_at = now
        return True

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM jobs WHERE id=?", (job_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def push_job(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO job_queue (id) SELECT ? WHERE NOT EXISTS "
                               "(SELECT 1 FROM job_queue WHERE id=?)", (job_id, job_id))

    def pop_job(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                row = self._conn.execute(
                    "SELECT seq, id FROM job_queue ORDER BY seq LIMIT 1").fetchone()
                if row:
                    self._conn.execute("DELETE FROM job_queue WHERE seq=?", (row[0],))
                self._conn.execute("COMMIT")
            if row:
                return row[1]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def queued_job_ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT id FROM job_queue")}

    def close(self) -> None:
        self._conn.close()


class RedisRegistry(Registry):
    """Facts as JSON under `{prefix}:fact:{owner}`, their owners in a sorted set."""

    def __init__(self, url: str, prefix: str = "mome"):
        import redis

        # Timeouts: a Redis that stops answering must fail a call, not hang the server.
        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                           socket_connect_timeout=REDIS_TIMEOUT_S,
                                           health_check_interval=30)
        self._redis.ping()
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}:store-version"
        # Atomic in Redis: a job is pushed only when it is not waiting already.
        self._push_once = self._redis.register_script(
            "if redis.call('LPOS', KEYS[1], ARGV[1]) == false then "
            "redis.call('RPUSH', KEYS[1], ARGV[1]) end")

    def _key(self, owner: int) -> str:
        return f"{self.prefix}:fact:{owner}"

    def new_owner(self) -> int:
        return int(self._redis.incr(f"{self.prefix}:owner-counter"))

    def put(self, fact: FactRecord) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._key(fact.owner), fact.to_json())
        pipe.zadd(f"{self.prefix}:facts", {str(fact.owner): fact.owner})
        pipe.execute()

    def get(self, owner: int) -> FactRecord | None:
        body = self._redis.get(self._key(owner))
        return FactRecord.from_json(body) if body else None

    def _read_modify_write(self, owner, apply):
        import redis

        key = self._key(owner)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # the transaction fails if anyone writes the fact meanwhile
                    body = pipe.get(key)
                    if not body:
                        raise KeyError(fact_id_of(owner))
                    fact = apply(FactRecord.from_json(body))
                    pipe.multi()
                    pipe.set(key, fact.to_json())
                    pipe.execute()
                    return fact
                except redis.WatchError:
                    continue

    def all(self) -> list[FactRecord]:
        owners = self._redis.zrange(f"{self.prefix}:facts", 0, -1)
        if not owners:
            return []
        bodies = self._redis.mget([self._key(int(o)) for o in owners])
        return [FactRecord.from_json(b) for b in bodies if b]

    def delete(self, owner: int) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key(owner))
        pipe.zrem(f"{self.prefix}:facts", str(owner))
        return bool(pipe.execute()[0])

    def put_job(self, job: JobRecord) -> None:
        expires = (self.job_retention_s if job.finished_at is not None
                   and self.job_retention_s is not None else None)
        self._redis.set(f"{self.prefix}:job:{job.id}", job.to_json(),
                        px=int(expires * 1000) if expires is not None else None)

    def get_job(self, job_id: str) -> JobRecord | None:
        body = self._redis.get(f"{self.prefix}:job:{job_id}")
        return JobRecord.from_json(body) if body else None

    def push_job(self, job_id: str) -> None:
        self._push_once(keys=[f"{self.prefix}:job-queue"], args=[job_id])

    def pop_job(self, timeout: float) -> str | None:
        queue = f"{self.prefix}:job-queue"
        if timeout <= 0:  # BLPOP's 0 would mean "wait forever"
            item = self._redis.lpop(queue)
            return item.decode() if item else None
        item = self._redis.blpop([queue], timeout=max(1, int(min(timeout, REDIS_TIMEOUT_S - 1))))
        return item[1].decode() if item else None

    def queued_job_ids(self) -> set[str]:
        return {item.decode() for item in self._redis.lrange(f"{self.prefix}:job-queue", 0, -1)}

    def publish_version(self, version: int) -> None:
        self._redis.publish(self.channel, str(version))

    def subscribe_versions(self, callback: Callable[[int], None]) -> Callable[[], None]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{self.channel: lambda message: callback(int(message["data"]))})
        def keep_listening(error, _pubsub, _thread) -> None:
            # Redis went away: the subscription comes back with the connection (redis-py
            # subscribes again on reconnect); notices sent meanwhile are announced again.
            logger.warning("store-version notices interrupted: %s", error)
            time.sleep(1.0)

        thread = pubsub.run_in_thread(sleep_time=0.05, daemon=True,
                                      exception_handler=keep_listening)

        def unsubscribe() -> None:
            thread.stop()
            pubsub.close()

        return unsubscribe

    def close(self) -> None:
        self._redis.close()


def open_registry(store_dir: str, redis_url: str | None = None,
                  job_retention_s: float | None = None) -> Registry:
    """Redis when a URL is given, else the SQLite file beside the store."""
    registry = (RedisRegistry(redis_url) if redis_url
                else SQLiteRegistry(f"{store_dir}/registry.sqlite3"))
    registry.job_retention_s = job_retention_s
    return registry
