"""The Compose deployment's files, checked without a Docker engine (part of `make test`).

The stack runs for real in tests/docker/compose_e2e.py (`make test-compose`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def load(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def test_services_and_their_wiring():
    compose = load()
    assert "version" not in compose  # the Compose Specification (conditions + reservations)
    services = compose["services"]
    assert set(services) == {"generation", "worker", "redis", "proxy"}
    gen, worker, proxy, redis = (services[s] for s in ("generation", "worker", "proxy", "redis"))
    assert gen["command"] == ["serve"] and worker["command"][0] == "worker"
    for svc in (gen, worker):
        env = svc["environment"]
        assert env["MOME_REDIS_URL"] == "redis://redis:6379/0"
        assert env["MOME_WORKER"] == "external"
        assert env["MOME_STORE_DIR"].startswith("/data/")  # on the shared volume
        assert env["MOME_ADMIN_KEY"].startswith("${MOME_ADMIN_KEY:?")  # required, with a message
        assert svc["volumes"] == ["store:/data"]
        assert svc["image"] == gen["image"] and svc["build"] == gen["build"]
        assert svc["init"] is True  # `docker stop` reaches mome (not PID 1)
    # Replicas scale: nothing in generation pins a name or a host port.
    assert "ports" not in gen and "container_name" not in gen
    assert gen["depends_on"]["redis"]["condition"] == "service_healthy"
    assert proxy["depends_on"]["generation"]["condition"] == "service_healthy"
    assert worker["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert re.fullmatch(r"\$\{MOME_BIND:-[\d.]+\}:\$\{MOME_PORT:-8000\}:8080", proxy["ports"][0])
    assert '"--appendonly", "yes"' in (DOCKER / "redis" / "Dockerfile").read_text()
    assert redis["volumes"] == ["redis:/data"]
    assert set(compose["volumes"]) == {"store", "redis"}
    for svc in (gen, proxy, redis):
        assert svc["healthcheck"]["test"][0] == "CMD"
    assert gen["shm_size"]  # vLLM needs more than Docker's 64 MiB of /dev/shm


def test_gpu_reservation_only_in_the_gpu_file():
    assert "deploy" not in load()["services"]["generation"]
    gpu = load("compose.gpu.yaml")["services"]["generation"]["deploy"]
    assert gpu["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    cpu = load("compose.cpu.yaml")["services"]
    assert set(cpu) == {"generation", "worker"}
    for svc in cpu.values():
        assert "deploy" not in svc and svc["build"]["args"]["EXTRA"] == "cpu"
    assert load()["services"]["generation"]["build"]["args"]["EXTRA"] == "cuda"


def test_worker_reaches_the_proxy_and_the_proxy_the_replicas():
    worker = load()["services"]["worker"]
    url = worker["command"][worker["command"].index("--url") + 1]
    assert url == "http://proxy:8080"
    cfg = (DOCKER / "proxy" / "haproxy.cfg").read_text()
    assert "bind *:8080" in cfg
    assert re.search(r"server-template \w+ \d+ generation:8000", cfg)
    assert "nameserver dns 127.0.0.11:53" in cfg and "option httpchk GET /health" in cfg


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_dockerfiles_copy_what_exists():
    for dockerfile, context in ((DOCKER / "Dockerfile", ROOT),
                                (DOCKER / "proxy" / "Dockerfile", DOCKER / "proxy"),
                                (DOCKER / "redis" / "Dockerfile", DOCKER / "redis")):
        for src in _copy_sources(dockerfile):
            assert (context / src).exists(), (dockerfile, src)
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "ARG EXTRA=" in text
    assert re.search(r"^USER mome$", text, re.M)  # not root
    # Dependencies are installed before the sources are copied (layer reuse).
    assert text.index("pip install --quiet -r") < text.index("COPY server")


def test_dockerignore_keeps_the_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "reports", "bench/results", "**/__pycache__"} <= ignored
    for needed in ("server", "model", "expert_store", "client", "pyproject.toml", "docker/pip"):
        assert needed not in ignored


def test_commands_exist():
    from client.cli import build_parser

    parser = build_parser()
    for name in ("generation", "worker"):
        parser.parse_args(load()["services"][name]["command"])  # exits on an unknown flag


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_reads_the_files():
    """docker-compose itself: the files merge, the CPU stack has no GPU, the key is required."""
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "MOME_ADMIN_KEY": "abcdefgh-key"}
    base = ["docker-compose", "-f", str(DOCKER / "compose.yaml")]

    def config(extra: str, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([*base, "-f", str(DOCKER / extra), "config"], env=env,
                              capture_output=True, text=True)

    cpu, gpu = config("compose.cpu.yaml", env), config("compose.gpu.yaml", env)
    assert cpu.returncode == 0 and gpu.returncode == 0, cpu.stderr + gpu.stderr
    assert "nvidia" not in cpu.stdout and "EXTRA: cpu" in cpu.stdout
    assert "driver: nvidia" in gpu.stdout and "EXTRA: cuda" in gpu.stdout
    missing = config("compose.cpu.yaml", {"PATH": env["PATH"]})
    assert missing.returncode != 0 and "set MOME_ADMIN_KEY" in missing.stderr
