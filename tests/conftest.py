"""Shared fixtures: one real server per test session, a throwaway redis-server."""

from __future__ import annotations

import pytest

from client.launcher import RedisProcess, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """The real `mome serve` on the bundled backbone, shared by every route test."""
    workdir = tmp_path_factory.mktemp("server")
    proc = ServerProcess(workdir / "server.log",
                         env={"MOME_ADMIN_KEY": "test-admin-key",
                              "MOME_STORE_DIR": str(workdir / "store")}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def model_name(server) -> str:
    import httpx

    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


@pytest.fixture()
def redis_server(tmp_path):
    proc = RedisProcess(tmp_path).start()
    yield proc
    proc.stop()
