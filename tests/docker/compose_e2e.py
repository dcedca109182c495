"""The Docker Compose deployment for real: `make test-compose` (CI runs it after `make test`).

On a private Docker daemon (its own data root, socket and pid file; stopped by its pid at the
end, also on failure): build a Debian base image from Debian packages, build the images for
CPU, bring the stack up with docker/compose.cpu.yaml and two generation replicas, memorize
two facts through the admin API (behind the proxy), check the exact answers on each replica
directly (their addresses on the project's bridge network), restart the stack (`restart`,
then `down` and `up`) and check again, then `down -v`.

Needs root and apt (it installs docker.io, docker-compose and mmdebstrap when missing) and no
other Docker daemon on the host. Not collected by `pytest tests` (no test_ prefix).

Environment:
  MOME_COMPOSE_DOCKER_ROOT  keep the daemon's data here and reuse it (image layers, the base
                            image) across runs; default: a temporary directory, removed
  MOME_COMPOSE_REPORT       write the measured figures to this JSON file
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "mometest"
FILES = ["-f", str(ROOT / "docker" / "compose.yaml"), "-f", str(ROOT / "docker" / "compose.cpu.yaml")]
BASE_IMAGE = "mome-debian:bookworm"
KEY = "compose-e2e-admin-key"
REPLICAS = 2
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "mmdebstrap": "mmdebstrap"}


def log(message: str) -> None:
    sys.stderr.write(f"[compose-e2e {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def facts(n: int = 3) -> list[dict]:
    rows = [json.loads(line) for line in
            (ROOT / "tests" / "data" / "counterfact-slice.jsonl").read_text().splitlines()[:n]]
    return [{"prompt": r["prompt"], "completion": r["target_new"], "subject": r["subject"]}
            for r in rows]


# ---- the host: packages and a private Docker daemon ---------------------------------------------


def ensure_packages() -> None:
    missing = sorted({pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # On a host with an init system, installing docker.io would start the system's dockerd
    # (whose bridge and iptables chains clash with this test's): policy-rc.d forbids starting
    # services while the packages install.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    finally:
        if ours:
            policy.unlink()


def docker_cli() -> str:
    """The CLI of the docker.io package (matches its daemon) before any other on the PATH."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")


class Dockerd:
    """dockerd on private paths, at the lowest CPU priority (its builds and containers too)."""

    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.pidfile = root / "dockerd.pid"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Dockerd:
        others = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
        if others.strip():
            raise RuntimeError(f"another dockerd runs here (pid {others.split()}); its bridge "
                               "and iptables chains would clash with this test's daemon")
        for sub in ("data", "exec"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["nice", "-n", "19", "dockerd", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "-H", self.host,
             "--pidfile", str(self.pidfile)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {self.tail()}")
            if subprocess.run([docker_cli(), "-H", self.host, "version"],
                              capture_output=True).returncode == 0:
                log(f"dockerd pid {self.proc.pid} on {self.sock}")
                return self
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer: {self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # it stops its containers and its containerd
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()
        log(f"dockerd pid {self.proc.pid} stopped")

    def tail(self, n: int = 4000) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def unmount_under(root: Path) -> None:
    """Mounts a killed daemon may leave behind (overlays, netns) block removing its root."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


# ---- the stack ----------------------------------------------------------------------------------


class Stack:
    def __init__(self, daemon: Dockerd, port: int):
        self.daemon = daemon
        self.port = port
        self.proxy_url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "DOCKER_HOST": daemon.host, "MOME_ADMIN_KEY": KEY,
                    "MOME_DEBIAN_IMAGE": BASE_IMAGE, "MOME_PORT": str(port),
                    "MOME_BIND": "127.0.0.1", "COMPOSE_HTTP_TIMEOUT": "300",
                    "DOCKER": docker_cli()}
        self.env.pop("DOCKER_BUILDKIT", None)

    def docker(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([docker_cli(), *args], env=self.env, check=check, text=True,
                              capture_output=True, **kw)

    def compose(self, *args: str, check: bool = True, env: dict | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker-compose", "-p", PROJECT, *FILES, *args],
                                env=env or self.env, text=True, capture_output=True,
                                timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed "
                               f"({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        return result

    def containers(self, service: str) -> list[str]:
        """The service's containers (any state), in replica order (docker ps is quicker than
        docker-compose ps)."""
        out = self.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--filter", f"label=com.docker.compose.service={service}",
                          "--format", "{{.Label \"com.docker.compose.container-number\"}} {{.ID}}")
        rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
        return [cid for _, cid in sorted(rows, key=lambda row: int(row[0]))]

    def inspect(self, cid: str) -> dict:
        return json.loads(self.docker("inspect", cid).stdout)[0]

    def ip(self, cid: str) -> str:
        return self.inspect(cid)["NetworkSettings"]["Networks"][f"{PROJECT}_default"]["IPAddress"]

    def health(self, cid: str) -> str:
        state = self.inspect(cid)["State"]
        return state.get("Health", {}).get("Status") or state["Status"]

    def up(self, timeout: float = 1200) -> float:
        """`up -d` with two replicas; seconds until every container is up and healthy."""
        start = time.monotonic()
        proc = subprocess.Popen(["docker-compose", "-p", PROJECT, *FILES, "up", "-d",
                                 "--scale", f"generation={REPLICAS}"],
                                env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            while True:
                assert time.monotonic() - start < timeout, "the stack did not come up in time"
                self._fail_fast()
                if proc.poll() is not None:
                    output = proc.stdout.read()
                    assert proc.returncode == 0, f"docker-compose up failed:\n{output[-5000:]}"
                    if self._all_healthy():
                        return time.monotonic() - start
                time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def wait_healthy(self, timeout: float = 900) -> float:
        start = time.monotonic()
        while not self._all_healthy():
            assert time.monotonic() - start < timeout, "the stack did not become healthy"
            self._fail_fast()
            time.sleep(1)
        return time.monotonic() - start

    def _all_healthy(self) -> bool:
        gens = self.containers("generation")
        if len(gens) != REPLICAS:
            return False
        for service in ("generation", "proxy", "redis"):
            for cid in self.containers(service):
                if self.health(cid) != "healthy":
                    return False
        workers = self.containers("worker")
        return bool(workers) and all(self.health(c) == "running" for c in workers)

    def _fail_fast(self) -> None:
        """A replica whose engine failed answers 503 forever: fail now, not after start_period."""
        for cid in self.containers("generation"):
            state = self.inspect(cid)["State"]
            assert state["Status"] in ("created", "running", "restarting"), \
                f"generation container {cid[:12]} is {state['Status']}"
            if state["Status"] != "running":
                continue
            body = self.docker("exec", cid, "curl", "-s", "http://127.0.0.1:8000/health",
                               check=False).stdout
            assert "failed" not in body, f"generation {cid[:12]}: {body}"

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "80", check=False).stdout


# ---- the API ----------------------------------------------------------------------------------


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})


def complete(url: str, prompt: str) -> dict:
    body = {"model": MODEL[0], "prompt": prompt, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


MODEL: list[str] = []  # the served model's name, read once


def answers(url: str, fact: dict, fact_id: str) -> bool:
    """The exact memorized answer (whitespace normalized, as the worker verifies it), and
    the fact named in `mome_facts`."""
    reply = complete(url, fact["prompt"])
    text = " ".join(reply["choices"][0]["text"].split())
    return text.startswith(fact["completion"]) and fact_id in reply.get("mome_facts", [])


def check_all(stack: Stack, posted: list[dict], fact_ids: list[str], label: str) -> None:
    replicas = stack.containers("generation")
    assert len(replicas) == REPLICAS
    for name, url in [("proxy", stack.proxy_url)] + [
            (f"replica {i}", f"http://{stack.ip(cid)}:8000") for i, cid in enumerate(replicas)]:
        for fact, fact_id in zip(posted, fact_ids):
            reply = complete(url, fact["prompt"])
            text = " ".join(reply["choices"][0]["text"].split())
            assert text.startswith(fact["completion"]), (label, name, fact, reply)
            assert fact_id in reply.get("mome_facts", []), (label, name, reply)
    with admin(stack.proxy_url) as client:
        listed = {f["id"]: f["status"] for f in client.get("/v1/facts").json()["data"]}
    assert all(listed.get(i) == "memorized" for i in fact_ids), (label, listed)
    log(f"{label}: {len(posted)} facts answered exactly by the proxy and by each replica")


def answer_times(urls: list[str], posted: list[dict], fact_ids: list[str],
                 timeout: float = 120) -> list[tuple[float, float]]:
    """For each replica, the first round of questions it answered right, all of them: when
    it was sent and when the last answer came (one thread per replica)."""
    times: list[tuple[float, float] | None] = [None] * len(urls)

    def ask(i: int) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = time.time()
            with suppress(httpx.HTTPError):
                if all(answers(urls[i], f, fact_id) for f, fact_id in zip(posted, fact_ids)):
                    times[i] = (sent, time.time())
                    return
            time.sleep(0.05)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert None not in times, f"a replica never answered the memorized facts: {times}"
    return times


def assert_proxy_balances(stack: Stack, prompt: str) -> None:
    """Requests through the proxy reach both replicas (HAProxy logs the server of each)."""
    for _ in range(6):
        complete(stack.proxy_url, prompt)
    logs = stack.docker("logs", stack.containers("proxy")[0], check=False)
    served = {line.split("generation/")[1].split()[0]
              for line in (logs.stdout + logs.stderr).splitlines()
              if "generation/" in line and "/v1/completions" in line}
    assert len(served) == REPLICAS, f"the proxy sent completions to {served}"
    log(f"the proxy balanced completions across {sorted(served)}")


class VersionWatch:
    """When each replica first serves a store version above the one it started from."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.start = [self._version(u) for u in urls]
        self.reached: list[float | None] = [None] * len(urls)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _version(url: str) -> int:
        with admin(url) as client:
            return client.get("/v1/memory").json()["served_version"]

    def _run(self) -> None:
        while not self._stop.is_set() and None in self.reached:
            for i, url in enumerate(self.urls):
                if self.reached[i] is None:
                    with suppress(httpx.HTTPError):
                        if self._version(url) > self.start[i]:
                            self.reached[i] = time.time()
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---- the test -----------------------------------------------------------------------------------


def test_compose_stack_end_to_end():
    if os.geteuid() != 0:
        pytest.skip("needs root (its own Docker daemon, apt)")
    if shutil.which("apt-get") is None and not all(shutil.which(b) for b in PACKAGES):
        pytest.skip("no apt-get to install docker.io, docker-compose and mmdebstrap")
    t0 = time.monotonic()
    figures: dict = {}
    ensure_packages()
    keep = os.environ.get("MOME_COMPOSE_DOCKER_ROOT")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mome-compose-", dir="/var/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    daemon = Dockerd(root)
    stack: Stack | None = None
    try:
        daemon.start()
        from client.launcher import free_port

        stack = Stack(daemon, free_port())
        run_flow(stack, figures)
    except BaseException:
        if stack is not None and daemon.proc is not None and daemon.proc.poll() is None:
            log("failed; the stack's logs:\n" + stack.logs()[-20000:])
        raise
    finally:
        if stack is not None and daemon.proc is not None and daemon.proc.poll() is None:
            result = stack.compose("down", "-v", "--remove-orphans", check=False, timeout=600)
            log(f"down -v: rc {result.returncode}")
        daemon.stop()
        if not keep:
            unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
        figures["test_total_s"] = round(time.monotonic() - t0, 1)
        log("figures: " + json.dumps(figures))
        if report := os.environ.get("MOME_COMPOSE_REPORT"):
            Path(report).write_text(json.dumps(figures, indent=2) + "\n")


def run_flow(stack: Stack, figures: dict) -> None:
    # The admin key is required: compose refuses to start without it, and so does the image.
    env = {k: v for k, v in stack.env.items() if k != "MOME_ADMIN_KEY"}
    refused = stack.compose("config", check=False, env=env)
    assert refused.returncode != 0 and "set MOME_ADMIN_KEY" in refused.stderr, refused.stderr
    config = stack.compose("config").stdout
    assert "nvidia" not in config and "EXTRA: cpu" in config, config  # the CPU override applied

    t = time.monotonic()
    if stack.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        log(f"building {BASE_IMAGE} from Debian packages (mmdebstrap)")
        subprocess.run(["nice", "-n", "19", str(ROOT / "docker" / "base" / "build-base.sh"),
                        BASE_IMAGE], env=stack.env, check=True, capture_output=True)
    figures["base_image_s"] = round(time.monotonic() - t, 1)
    # pip inside the build: as configured on this host (index, CA bundle, local wheels).
    subprocess.run([sys.executable, str(ROOT / "docker" / "pip_from_host.py")], check=True,
                   capture_output=True)

    t = time.monotonic()
    log("building the images (CPU)")
    # worker shares generation's image (and build): building it too would only repeat it.
    stack.compose("build", "generation", "proxy", "redis", timeout=3600)
    figures["build_s"] = round(time.monotonic() - t, 1)
    images = stack.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}\t{{.Size}}").stdout
    figures["image_sizes"] = dict(line.split("\t") for line in images.splitlines()
                                  if not line.startswith("<none>"))
    log(f"images: {figures['image_sizes']}")
    user = stack.docker("run", "--rm", "--entrypoint", "id", "mome:latest", "-u").stdout.strip()
    assert user != "0", "the image runs as root"
    no_key = stack.docker("run", "--rm", "mome:latest", "serve", check=False)
    assert no_key.returncode == 2 and "MOME_ADMIN_KEY" in no_key.stderr, no_key

    log("up, two generation replicas")
    figures["cold_start_to_healthy_s"] = round(stack.up(), 1)
    log(f"healthy after {figures['cold_start_to_healthy_s']} s")
    redis = stack.containers("redis")[0]
    aof = stack.docker("exec", redis, "redis-cli", "config", "get", "appendonly").stdout.split()
    assert aof == ["appendonly", "yes"], aof

    replicas = stack.containers("generation")
    urls = [f"http://{stack.ip(cid)}:8000" for cid in replicas]
    MODEL[:] = [httpx.get(f"{stack.proxy_url}/v1/models", timeout=30).json()["data"][0]["id"]]
    posted, later = facts()[:2], facts()[2]
    watch = VersionWatch(urls)
    with admin(stack.proxy_url) as client:
        response = client.post("/v1/facts", json={"facts": posted})
        assert response.status_code == 202, response.text
        accepted = response.json()
        posted_at = time.time()
        deadline = time.monotonic() + 900
        while (job := client.get(f"/v1/jobs/{accepted['job_id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, "the worker did not finish the job"
            time.sleep(0.25)
    assert (job["memorized"], job["failed"]) == (2, 0), job
    done = job["finished_at"]
    figures["posted_to_job_done_s"] = round(done - posted_at, 2)
    # From the job's end until each replica answers both facts (asked in parallel; replica B
    # is the second). The seconds include answering itself (a few tokens on a busy CPU).
    answered = answer_times(urls, posted, accepted["fact_ids"])
    watch.stop()
    figures["job_done_to_replica_a_answers_s"] = round(answered[0][1] - done, 2)
    figures["job_done_to_replica_b_answers_s"] = round(answered[1][1] - done, 2)
    # Of which answering itself (both facts, one after the other, 8 tokens each).
    figures["replica_b_answering_both_s"] = round(answered[1][1] - answered[1][0], 2)
    figures["replica_b_asked_after_job_done_s"] = round(answered[1][0] - done, 2)
    # When each replica began serving the new store version, against the job's end: the
    # worker verifies through the proxy before it ends the job, so normally before it.
    figures["replica_serves_new_version_vs_job_done_s"] = [
        round(r - done, 2) if r else None for r in watch.reached]
    if all(watch.reached):
        figures["replica_refresh_spread_s"] = round(abs(watch.reached[0] - watch.reached[1]), 3)
    log(f"memorized: {figures}")
    check_all(stack, posted, accepted["fact_ids"], "after memorizing")
    assert_proxy_balances(stack, posted[0]["prompt"])

    # Redis restarts alone: the replicas subscribe again and follow the next version.
    stack.compose("restart", "redis", timeout=300)
    stack.wait_healthy()
    with admin(stack.proxy_url) as client:
        again = client.post("/v1/facts", json={"facts": [later]}).json()
        deadline = time.monotonic() + 600
        while (job := client.get(f"/v1/jobs/{again['job_id']}").json())["status"] != "done":
            assert time.monotonic() < deadline, "no job done after Redis restarted"
            time.sleep(0.25)
    assert job["memorized"] == 1, job
    answer_times(urls, [later], again["fact_ids"], timeout=60)
    posted, fact_ids = posted + [later], accepted["fact_ids"] + again["fact_ids"]
    check_all(stack, posted, fact_ids, "after Redis restarted alone")

    t = time.monotonic()
    stack.compose("restart", timeout=600)
    figures["restart_to_healthy_s"] = round(time.monotonic() - t + stack.wait_healthy(), 1)
    check_all(stack, posted, fact_ids, "after restart")

    t = time.monotonic()
    stack.compose("down", timeout=600)
    figures["down_s"] = round(time.monotonic() - t, 1)
    figures["up_again_to_healthy_s"] = round(stack.up(), 1)
    check_all(stack, posted, fact_ids, "after down and up (volumes kept)")
