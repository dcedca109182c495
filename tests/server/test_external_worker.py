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
