"""Property-based requests from the server's own OpenAPI document (schemathesis) against
every route of a real server, admin key given, with all of schemathesis's checks (statuses,
content types and bodies as documented, valid data accepted, invalid data refused, 405 with
`Allow` for other methods, the key enforced) and ours: no 5xx, every error in OpenAI's shape,
and the server answers correctly afterwards. The few exceptions, each for a rule the OpenAPI
format cannot state, are in schemathesis.toml beside this file.

Size: MOME_FUZZ_EXAMPLES examples per operation and phase. The default, 100, keeps
`.ci/run` within its time (700 took 9 to 33 minutes here, with the machine's load; most of
it is the real generations); 1400 made 15,069 requests in 18 minutes (README). One
generation request in three names the served model (fuzz_checks.py), so the engine runs
on fuzzed sampling fields too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from client.launcher import RedisProcess, ServerProcess

pytestmark = pytest.mark.slow

KEY = "fuzz-test-admin-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("MOME_FUZZ_EXAMPLES", "100"))
MIN_REQUESTS = 5 * EXAMPLES  # the stateful phase alone makes about as many as the examples


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A server whose facts are admitted and queued but not trained: with an external worker
    (none runs here) thousands of fuzzed facts cost no training. Memorization itself is
    tested by the crash and facts tests; a short context bounds every generation."""
    workdir = tmp_path_factory.mktemp("fuzz")
    redis_server = RedisProcess(workdir).start()
    proc = ServerProcess(workdir / "server.log", env={
        "MOME_ADMIN_KEY": KEY, "MOME_STORE_DIR": str(workdir / "store"),
        "MOME_MAX_MODEL_LEN": "96", "MOME_WORKER": "external",
        "MOME_REDIS_URL": redis_server.url}).start()
    yield proc
    proc.stop()
    redis_server.stop()


def test_fuzzed_requests_get_no_5xx_and_openai_errors(fuzz_server, tmp_path):
    report = tmp_path / "events.ndjson"
    model = httpx.get(f"{fuzz_server.url}/v1/models").json()["data"][0]["id"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.server.fuzz_checks", "MOME_FUZZ_MODEL": model,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
         f"{fuzz_server.url}/openapi.json", "--checks", "all",
         "--header", f"Authorization: Bearer {KEY}",
         "--max-examples", str(EXAMPLES), "--phases", "examples,coverage,fuzzing,stateful",
         # One worker: hypothesis parses lambda sources with ast, which is not thread-safe on
         # CPython 3.11 (a SystemError inside the tool, not a server failure, at 4 workers).
         "--workers", "1", "--request-timeout", "120", "--seed", "1",
         # Not schemathesis's 10 s: a 96-token generation on two shared CPU cores can take longer.
         "--max-response-time", "120",
         "--suppress-health-check", "all", "--report", "ndjson",
         "--report-ndjson-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=3000, env=env)
    summary = result.stdout[-4000:]
    requests = _count_requests(report)
    print(f"fuzz: {requests} requests", summary[-600:])  # noqa: T201 - the figure
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert requests >= MIN_REQUESTS, requests

    # Still serving correctly afterwards.
    answer = httpx.post(f"{fuzz_server.url}/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]


def _count_requests(path: Path) -> int:
    """HTTP requests the run made, from its ndjson event stream."""
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        count += line.count('"request":')  # one per recorded interaction
    return count


def test_openapi_document_lists_the_routes(fuzz_server):
    paths = httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/facts", "/v1/facts/{fact_id}",
            "/v1/jobs/{job_id}"} <= set(paths)
    assert json.dumps(paths)  # serializable as the fuzzer reads it


def test_openapi_document_states_errors_and_content_types(fuzz_server):
    paths = httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    error = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
    documented = {(path, method): {status: response.get("content", {})
                                   for status, response in operation["responses"].items()}
                  for path, operations in paths.items() for method, operation in operations.items()}
    for path, method, statuses in [
            ("/v1/chat/completions", "post", {"400", "413", "422", "503"}),
            ("/v1/completions", "post", {"400", "413", "422", "503"}),
            ("/v1/facts", "post", {"401", "404", "413", "422", "503"}),
            ("/v1/facts", "get", {"400", "401", "404", "413", "422", "503"}),
            ("/v1/facts/{fact_id}", "delete", {"401", "404", "409", "413", "503"}),
            ("/v1/jobs/{job_id}", "get", {"401", "404", "413", "503"}),
            ("/health", "get", {"413", "503"})]:
        responses = documented[path, method]
        assert statuses <= set(responses), (path, method, sorted(responses))
        assert all(responses[status] == {"application/json": error} for status in statuses)
    for path in ["/v1/chat/completions", "/v1/completions"]:
        assert set(documented[path, "post"]["200"]) == {"application/json", "text/event-stream"}
    assert list(documented["/metrics", "get"]["200"]) == [CONTENT_TYPE_LATEST]
    assert paths["/v1/facts"]["get"]["security"] == [{"HTTPBearer": []}]


@pytest.mark.parametrize("method", ["TRACE", "PATCH", "DELETE", "PUT", "OPTIONS"])
def test_undeclared_method_gets_405_with_allow(fuzz_server, method):
    for path, allowed in [("/v1/chat/completions", "POST"), ("/v1/facts", "GET, POST"),
                          ("/v1/facts/some-id", "DELETE, GET")]:
        if method in allowed:
            continue
        response = httpx.request(method, f"{fuzz_server.url}{path}")
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allowed
        assert response.json()["error"]["code"] == 405
