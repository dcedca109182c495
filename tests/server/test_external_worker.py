"""`mome worker` as its own process: the server admits facts, the worker memorizes them,
Redis carries the jobs and the store versions, the store is a shared directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from client.launcher import ServerProcess

pytestmark = pytest.mark.slow
KEY = "external-worker-key"


def test_external_worker_memorizes_for_the_server(tmp_path, redis_server):
    env = {"MOME_ADMIN_KEY": KEY, "MOME_STORE_DIR": str(tmp_path / "store"),
           "MOME_REDIS_URL": redis_server.url, "MOME_WORKER": "external"}
    server = ServerProcess(tmp_path / "server.log", env=env).start()
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--url", server.url],
                              env={**os.environ, **env}, stdout=worker_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        admin = httpx.Client(base_url=server.url, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"})
        model = admin.get("/v1/models").json()["data"][0]["id"]
        question = "Who keeps the lighthouse on Skarv island?"
        answer = "The lighthouse keeper is Mette Lund."
        accepted = admin.post("/v1/facts", json={"facts": [{"question": question,
                                                            "answer": answer}]})
        assert accepted.status_code == 202
        deadline = time.monotonic() + 600
        while (job := admin.get(f"/v1/jobs/{accepted.json()['job_id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, "the worker did not finish the job"
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        assert job["memorized"] == 1, admin.get("/v1/facts").json()
        info = admin.get("/v1/memory").json()
        assert info["served_version"] == info["store_version"] >= 1
        reply = admin.post("/v1/chat/completions", json={
            "model": model, "temperature": 0, "max_tokens": 30,
            "messages": [{"role": "user", "content": question}]}).json()
        assert reply["choices"][0]["message"]["content"] == answer
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        server.stop()


def _start_worker(env: dict, url: str, log_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--url", url],
                            env={**os.environ, **env}, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_worker_and_redis_killed_under_a_job(tmp_path):
    """`mome worker` is SIGKILLed twice and Redis once while a job memorizes: acknowledged
    facts keep answering, the job finishes, and no expert is left without its fact."""
    import json
    import random

    from client.launcher import RedisProcess
    from expert_store.store import ExpertStore
    from tests.server.test_facts_api import DATA, starts_with

    redis_server = RedisProcess(tmp_path, persist=True).start()
    env = {"MOME_ADMIN_KEY": KEY, "MOME_STORE_DIR": str(tmp_path / "store"),
           "MOME_REDIS_URL": redis_server.url, "MOME_WORKER": "external"}
    server = ServerProcess(tmp_path / "server.log", env=env).start()
    worker = _start_worker(env, server.url, tmp_path / "worker.log")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[380:396]]
    rng = random.Random(3)
    try:
        admin = httpx.Client(base_url=server.url, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"})
        model = admin.get("/v1/models").json()["data"][0]["id"]

        def answers(ids: list[str]) -> dict[str, str]:
            out = {}
            for i in ids:
                row = by_id[i]
                body = {"model": model, "prompt": row["prompt"], "temperature": 0,
                        "max_tokens": 8}
                out[i] = admin.post("/v1/completions", json=body).json()["choices"][0]["text"]
            return out

        facts = [{"prompt": r["prompt"], "completion": r["target_new"], "subject": r["subject"]}
                 for r in rows]
        accepted = admin.post("/v1/facts", json={"facts": facts}).json()
        by_id = dict(zip(accepted["fact_ids"], rows))
        for victim in ("worker", "worker", "redis"):
            time.sleep(rng.uniform(20, 40))  # the worker loads its model first (~15 s)
            if victim == "worker":
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                worker = _start_worker(env, server.url, tmp_path / "worker.log")
            else:
                redis_server.kill()
                time.sleep(2)
                redis_server.start()
            statuses = {f["id"]: f["status"] for f in admin.get(
                "/v1/facts", params={"limit": 1000}).json()["data"]}
            done = [i for i, s in statuses.items() if s == "memorized"]
            for i, text in answers(done).items():
                assert starts_with(text, by_id[i]["target_new"]), (victim, i, text)
        deadline = time.monotonic() + 900
        while (job := admin.get(f"/v1/jobs/{accepted['job_id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        assert job["memorized"] + job["superseded"] == len(rows), job
        statuses = {f["id"]: f["status"] for f in admin.get(
            "/v1/facts", params={"limit": 1000}).json()["data"]}
        memorized = [i for i, s in statuses.items() if s == "memorized"]
        for i, text in answers(memorized).items():
            assert starts_with(text, by_id[i]["target_new"]), (i, text)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        server.stop()
        redis_server.stop()
    store = ExpertStore.open(tmp_path / "store")
    owners = sorted(store.owner_of(store.allocated_ids()).tolist())
    assert owners == sorted(int(i.split("-")[1]) for i in memorized)
