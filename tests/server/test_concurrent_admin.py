"""Deletes and re-posts of facts while they train: the end state is that of a serial order of
the same operations (each delete that answered 204 took effect, each re-post replaced its
fact, nothing else changed), and no expert outlives its fact."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server.test_facts_api import DATA, complete, starts_with, wait_for_job

pytestmark = pytest.mark.slow

KEY = "test-admin-key"


def test_deletes_and_reposts_during_training(server):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[400:412]]
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=60)
    experts_before = admin.get("/v1/memory").json()["experts"]
    facts = [{"prompt": r["prompt"], "completion": r["target_new"], "subject": r["subject"]}
             for r in rows]
    accepted = admin.post("/v1/facts", json={"facts": facts}).json()
    ids = accepted["fact_ids"]
    deleted: set[int] = set()
    reposted: dict[int, str] = {}  # index -> job id of the replacement
    refused = 0

    def delete_until_gone(i: int) -> None:
        nonlocal refused
        while True:
            status = admin.delete(f"/v1/facts/{ids[i]}").status_code
            if status == 204:
                deleted.add(i)
                return
            assert status == 409, status  # training right now: try again
            refused += 1
            time.sleep(0.05)

    def repost(i: int) -> None:
        fact = {**facts[i], "completion": "Reykjavik"}
        reposted[i] = admin.post("/v1/facts", json={"facts": [fact]}).json()["job_id"]

    threads = [threading.Thread(target=delete_until_gone, args=(i,)) for i in (0, 3, 6, 9)]
    threads += [threading.Thread(target=repost, args=(i,)) for i in (1, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert wait_for_job(admin, accepted["job_id"])["status"] == "done"
    for job_id in reposted.values():
        assert wait_for_job(admin, job_id)["status"] == "done"

    assert deleted == {0, 3, 6, 9}
    memorized = 0
    for i, row in enumerate(rows):
        got = admin.get(f"/v1/facts/{ids[i]}")
        answer = complete(server, row["prompt"])
        if i in deleted:
            assert got.status_code == 404
            assert not starts_with(answer, row["target_new"]), (i, answer)
        elif i in reposted:
            assert got.json()["status"] == "superseded", got.json()
            assert starts_with(answer, "Reykjavik"), (i, answer)
            memorized += 1  # its replacement
        else:
            assert got.json()["status"] == "memorized", got.json()
            assert starts_with(answer, row["target_new"]), (i, answer)
            memorized += 1
    # One expert per memorized fact: nothing of the deleted or replaced facts is left.
    assert admin.get("/v1/memory").json()["experts"] - experts_before == memorized
    for i in range(len(rows)):  # clean up for the tests that share this server
        if i not in deleted:
            admin.delete(f"/v1/facts/{ids[i]}")
    for job_id in reposted.values():
        for fact_id in admin.get(f"/v1/jobs/{job_id}").json()["fact_ids"]:
            admin.delete(f"/v1/facts/{fact_id}")
