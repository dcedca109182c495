"""No Docker engine runs here: check the compose file's structure and what it points at."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_services_and_their_wiring():
    compose = load()
    services = compose["services"]
    assert set(services) == {"generation", "worker", "redis"}
    gen, worker = services["generation"], services["worker"]
    assert gen["command"] == ["serve"] and worker["command"][0] == "worker"
    assert "http://generation:8000" in worker["command"]
    for svc in (gen, worker):
        env = svc["environment"]
        assert env["MOME_REDIS_URL"].startswith("redis://redis:")
        assert env["MOME_WORKER"] == "external"
        assert env["MOME_STORE_DIR"].startswith("/data")  # on the shared volume
        assert svc["volumes"] == ["mome-data:/data"]
    assert gen["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["depends_on"]["generation"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"mome-data", "redis-data"}


def test_dockerfile_copies_what_exists_and_commands_exist():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    from client.cli import build_parser

    parser = build_parser()
    compose = load()
    for name in ("generation", "worker"):
        args = compose["services"][name]["command"]
        parser.parse_args(args)  # exits on an unknown command or flag
